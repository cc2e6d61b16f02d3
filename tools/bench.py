"""How fast is this BYOL? Augmentation, the training step and both together, on one machine and data.

    python tools/bench.py --device cuda            # GPU: batch 256, bf16 autocast + channels_last as train.py
    python tools/bench.py --device cuda --compile --graph   # + the compiled step, the step as one CUDA graph
    python tools/bench.py --device cpu             # CPU: batch 64 (a minute on 2 cores); --quick: seconds

It prints a table, then one JSON line (the last line of stdout) with the same numbers:

1. Augmentation, views/s: augment.Augment on a uint8 batch on the device (2 views per image) against
   the per-image torchvision.transforms.v2 pipeline on PIL images (the same VIEWS / JITTER) in a
   DataLoader with --workers processes; on the CPU Augment gets as many threads. PIL's resize antialiases.
2. One BYOL training step, images/s: train.byol_update (two views through online and target, loss,
   backward, LARS, EMA) on real augmented batches, median of --repeats timings of --steps steps each,
   in variants built by devices.prepare: fp32 (NCHW, no autocast: train.py's step on the CPU),
   channels_last (no autocast), bf16 (autocast + channels_last: train.py's on CUDA), compile (with
   --compile). cuDNN still uses TF32 in the fp32 ones.
3. End to end, images/s: index a batch of the on-device uint8 set, aug(x), byol_update, as train.py's
   loop (without its monitors), timed in turn with the bare step; data_path_overhead = 1 - step time /
   end-to-end time, the median over back-to-back pairs. The data path alone: data_path_ms_per_batch,
   and data_path_share_alone, its share of data path + step (what the CPU's noise hides otherwise).
   With --graph, also the whole loop body replayed as one CUDA graph (devices.StepGraph), and with
   --compile that over the compiled model: graph_images_per_s (on the CPU: the graph-ready step, eager).
4. FLOPs per image of one step (a multiply-add = 2), TFLOP/s per variant and, on CUDA, the share of the
   dense bf16 peak (--peak-tflops). 5. Peak memory: CUDA's per variant, or the max RSS. 6. The data path
   in images/s on the same --images files: in memory (index, aug) and --stream's (--workers DataLoader
   workers decode and crop, aug on the device), the median of --repeats epochs.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the project's own modules, whatever the working folder
from machinery import startup  # noqa: F401  (before torch: Ctrl-C while torch loads is one line)
import argparse
import gc
import json
import platform
import resource
import statistics
import time

import torch
import torchvision.transforms.v2 as v2
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import augment
from models import ARCHS, BYOL
from optim import make_optimizer
import train
from machinery import data
from machinery.batches import stream_batches
from machinery.devices import StepGraph, compiler_missing, host_memory_available, pick_device, prepare, synchronize
from machinery.files import cache_dir
from machinery.flags import number
from machinery.runs import cli

VARIANTS = ("fp32", "channels_last", "bf16", "compile")
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets; first match wins.
PEAK_BF16_TFLOPS = {"H200": 989, "H100 PCIe": 756, "H100": 989, "A100": 312, "RTX A6000": 155, "4090": 165}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", help="cpu | cuda (default: cuda when available)")
    p.add_argument("--batch-size", type=number(int, 2, 4096), help="per step; default 256 cuda, 64 cpu, 8 --quick")
    p.add_argument("--arch", default=train.DEFAULTS["arch"], choices=ARCHS)
    p.add_argument("--image-size", type=number(int, 8, 1024), default=train.DEFAULTS["image_size"], help="px")
    p.add_argument("--hidden-dim", type=number(int, 1, 65536), default=train.DEFAULTS["hidden_dim"], help="MLP width")
    p.add_argument("--workers", type=number(int, 0, 256), default=1, help="DataLoader workers, Augment's CPU threads")
    p.add_argument("--images", type=number(int, 1, 10**7), help="images from --data; default 2048, 64 --quick")
    p.add_argument("--repeats", type=number(int, 1, 1000), help="timed repeats (the median): 5 cuda, 3 cpu, 2 --quick")
    p.add_argument("--steps", type=number(int, 1, 10_000), help="steps per repeat; default 20 cuda, 2 cpu, 1 --quick")
    p.add_argument("--warmup", type=number(int, 0, 10_000), help="untimed steps first; default 5 cuda, 1 cpu")
    p.add_argument("--compile", action="store_true", help="also time the torch.compile'd step")
    p.add_argument("--graph", action="store_true", help="also time the step as one CUDA graph (--cuda-graph)")
    p.add_argument("--peak-tflops", type=number(float, 1e-3, 1e6), help="dense bf16 peak; default by device name")
    p.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data", "cifar10-jpg", "train"),
                   help="an ImageFolder of real images (default: the shared CIFAR-10 JPEGs)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: every field in seconds (and compile, if asked)")
    p.add_argument("--cache-dir", help="where decoded ImageFolders are kept (default: ~/.cache/byol-reproduction)")
    args = p.parse_args(argv)
    args.device = str(pick_device(args.device))
    if args.compile and compiler_missing(args.device):
        raise SystemExit(f"error: {compiler_missing(args.device)}")
    for key, (quick, gpu, cpu) in dict(batch_size=(8, 256, 64), images=(64, 2048, 2048), repeats=(2, 5, 3),
                                       steps=(1, 20, 2), warmup=(1, 5, 1)).items():
        if getattr(args, key) is None:  # an explicit flag wins, then --quick, then the device's default
            setattr(args, key, quick if args.quick else gpu if args.device.startswith("cuda") else cpu)
    if data.in_memory_bytes(args.images, args.image_size) > (host_memory_available() or float("inf")) / 4:
        raise SystemExit(f"error: --images {args.images} at {args.image_size} px would fill this machine's memory")
    return args


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model} ({os.cpu_count()} cores)"


def default_peak_tflops(name):
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def load_images(args):
    """(uint8 N x 3 x S x S on the CPU, their source): random only where --data holds no ImageFolder at all."""
    try:
        n = len(data.folder_files(args.data))
    except data.DataError as e:
        print(f"warning: no real images ({str(e).splitlines()[0]}); using random uint8 images instead")
        return (torch.randint(0, 256, (args.images, 3, args.image_size, args.image_size), dtype=torch.uint8),
                f"{args.images} RANDOM uint8 images ({args.data} not usable)")
    if args.images > n:
        raise SystemExit(f"error: --images {args.images} is more than the {n} images in {args.data}; lower --images")
    images, _ = data.load(args.data, split="train", image_size=args.image_size, subset=args.images,
                          cache=cache_dir(args.cache_dir), workers=2)
    return images, f"{len(images)} real images from {os.path.normpath(args.data)}"


def timed(fns, device, warmup, steps, repeats):
    """Seconds per call of each fn(i), one list per fn with one entry per repeat: warm-up calls, then
    `repeats` rounds that each time `steps` calls of every fn in turn (interleaved, in the reverse order
    every other round, so that a change of load on a shared machine hits them alike), with CUDA events
    on the GPU and perf_counter on the CPU."""
    for fn in fns:
        for i in range(warmup):
            fn(i)
    times = [[] for _ in fns]
    for r in range(repeats):
        turn = list(zip(fns, times))
        for fn, t in (turn if r % 2 == 0 else turn[::-1]):
            first = warmup + r * steps
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for i in range(first, first + steps):
                    fn(i)
                end.record()
                end.synchronize()
                t.append(start.elapsed_time(end) / 1e3 / steps)
            else:
                t0 = time.perf_counter()
                for i in range(first, first + steps):
                    fn(i)
                t.append((time.perf_counter() - t0) / steps)
    return times


# ---- 1. augmentation ---------------------------------------------------------------------------

def torchvision_view(recipe, image_size, blur, kernel_size):
    """One view of the usual per-image pipeline on a PIL image, with augment.py's probabilities."""
    ops = [v2.RandomResizedCrop(image_size, recipe["crop_scale"], recipe["crop_ratio"],
                                v2.InterpolationMode.BICUBIC, antialias=True),  # PIL always antialiases
           v2.RandomHorizontalFlip(recipe["flip"]),
           v2.RandomApply([v2.ColorJitter(**augment.JITTER)], p=recipe["jitter"]),
           v2.RandomGrayscale(recipe["gray"])]
    if blur and recipe["blur"] > 0:
        ops.append(v2.RandomApply([v2.GaussianBlur(kernel_size, augment.BLUR_SIGMA)], p=recipe["blur"]))
    ops += [v2.RandomSolarize(128, p=recipe["solarize"]),  # uint8 pixels >= 128, i.e. >= 0.5 as Augment
            v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(augment.CIFAR10_MEAN, augment.CIFAR10_STD)]
    return v2.Compose(ops)


class TwoViews(torch.utils.data.Dataset):
    """PIL images -> (view1, view2) through the per-image torchvision pipeline."""

    def __init__(self, images, transforms):
        self.images, self.transforms = images, transforms

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return tuple(t(self.images[i]) for t in self.transforms)


def bench_torchvision(images, aug, args):
    """views/s of the DataLoader, median over epochs after one warm-up epoch (which starts the workers)."""
    pil = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in images]
    transforms = [torchvision_view(augment.VIEWS[v], args.image_size, aug.blur, aug.kernel_size) for v in ("view1", "view2")]
    loader = torch.utils.data.DataLoader(TwoViews(pil, transforms), batch_size=args.batch_size, shuffle=True,
                                         num_workers=args.workers, persistent_workers=args.workers > 0)
    times = []
    for epoch in range(1 + args.repeats):
        t0 = time.perf_counter()
        for view1, view2 in loader:
            pass
        times.append(time.perf_counter() - t0)
    del loader
    return 2 * len(pil) / statistics.median(times[1:])


def bench_augment(images, aug, args, device):
    """views/s of Augment on one batch on the device; on CPU with as many threads as --workers."""
    x = images[:args.batch_size]
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(max(1, args.workers))
    try:
        seconds, = timed([lambda i: aug(x)], device, args.warmup, 10 * args.steps, args.repeats)
    finally:
        torch.set_num_threads(threads)
    return 2 * len(x) / statistics.median(seconds)


# ---- 2-4. the training step ----------------------------------------------------------------------

def build(variant, args, device, graphed=False):
    """(model, forward, optimizer) for one variant, fresh; devices.prepare sets its precision and
    memory format as train.py does, except that fp32 and channels_last force autocast off."""
    model = BYOL(args.arch, args.image_size, args.hidden_dim, train.DEFAULTS["proj_dim"]).to(device)
    if variant in ("fp32", "channels_last"):
        forward = prepare(model, device, channels_last=variant == "channels_last", bf16=False)
    else:
        forward = prepare(model, device, compile=variant == "compile", graphed=graphed)
    return model, forward, make_optimizer(model, train.DEFAULTS)


def lr_tau(args):
    """The recipe's peak lr and first tau: the values a step of train.py runs with."""
    return train.DEFAULTS["base_lr"] * args.batch_size / 256, train.DEFAULTS["tau_base"]


def bench_step(variant, views, args, device, images=None, aug=None):
    """images/s of byol_update on pre-made augmented views and, given images and aug, of train.py's
    loop body too (index a batch of the on-device set, aug(x), byol_update), the two timed in turn on
    one model. Returns (step images/s, end-to-end images/s or None, the data path's share of each
    step's time per repeat or None, peak CUDA memory in bytes or None). A share is 1 - step time /
    end-to-end time of one pair timed back to back; their median is steadier than a ratio of the two
    medians on a noisy machine."""
    model, forward, optimizer = build(variant, args, device)
    lr, tau, B = *lr_tau(args), args.batch_size

    def step(i):
        train.byol_update(model, forward, optimizer, *views[i % len(views)], lr, tau)

    def end_to_end(i):
        j = i % (len(images) // B)
        train.byol_update(model, forward, optimizer, *aug(images[perm[j * B:(j + 1) * B]]), lr, tau)  # x: B x 3 x H x W uint8
    if images is None:
        t_step, = timed([step], device, args.warmup, args.steps, args.repeats)
        return B / statistics.median(t_step), None, None, peak_memory(device)
    perm = torch.randperm(len(images), device=device)
    t_step, t_e2e = timed([step, end_to_end], device, args.warmup, args.steps, args.repeats)
    shares = [1 - s / e for s, e in zip(t_step, t_e2e)]
    return B / statistics.median(t_step), B / statistics.median(t_e2e), shares, peak_memory(device)


def bench_graph(images, aug, args, device, compile=False):
    """images/s of train.py's loop body (index a batch, aug(x), byol_update) replayed as one CUDA graph
    (devices.StepGraph, train.py --cuda-graph), over a compiled model if asked; on the CPU the same
    graph-ready step runs eagerly on the graph's buffers."""
    model, forward, optimizer = build("compile" if compile else "bf16", args, device, graphed=True)
    graph = StepGraph(lambda x, _, lr, tau: train.byol_update(model, forward, optimizer, *aug(x), lr, tau), device)
    perm, B = torch.randperm(len(images), device=device), args.batch_size

    def step(i):
        j = i % (len(images) // B)
        graph(images[perm[j * B:(j + 1) * B]], perm[:B], *lr_tau(args))
    seconds, = timed([step], device, max(3, args.warmup), args.steps, args.repeats)  # warm-up: the capture
    return B / statistics.median(seconds)


def bench_data_path(images, aug, args, device):
    """Seconds per batch of train.py's data path alone (index a batch of the on-device set, aug(x)),
    with the threads train.py has: with the step's time, the data path's share when nothing overlaps."""
    perm, B = torch.randperm(len(images), device=device), args.batch_size

    def data_path(i):
        j = i % (len(images) // B)
        return aug(images[perm[j * B:(j + 1) * B]])
    seconds, = timed([data_path], device, args.warmup, 10 * args.steps, args.repeats)
    return statistics.median(seconds)


def bench_streaming(aug, args, device):
    """images/s of train.py's --stream data path over the same files, or None without an ImageFolder."""
    if not data.is_image_folder(args.data):
        return None
    files = data.folder_files(args.data, subset=args.images)  # (load_images: no more than the folder holds)
    dataset, cfg = data.StreamingFolder(files, args.image_size), dict(batch_size=args.batch_size, workers=args.workers)
    times = []
    for _ in range(args.repeats):
        synchronize(device)
        t0 = time.perf_counter()
        for crops in stream_batches(dataset, torch.randperm(len(files)), 0, cfg, 0, 1, device):
            aug(crops)
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return len(files) // args.batch_size * args.batch_size / statistics.median(times)


def count_flops(images, aug, args, device):
    """FLOPs per image of one fp32 training step, counted on a small batch (matmuls and convolutions)."""
    n = min(4, args.batch_size)
    model, forward, optimizer = build("fp32", args, device)
    view1, view2 = aug(images[:n])
    with FlopCounterMode(display=False) as counter:
        train.byol_update(model, forward, optimizer, view1, view2, *lr_tau(args))
    return counter.get_total_flops() / n


def peak_memory(device):
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def release(device):
    """Frees the last variant's model; resets the CUDA peak for the next one."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ---- the report ---------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    t_start = time.perf_counter()
    images_cpu, source = load_images(args)
    if len(images_cpu) < args.batch_size:
        raise SystemExit(f"error: --batch-size {args.batch_size} exceeds the {len(images_cpu)} images; raise --images")
    images = images_cpu.to(device)
    aug = augment.Augment(args.image_size)
    name = device_name(device)
    peak = args.peak_tflops or (default_peak_tflops(name) if cuda else None)

    aug_views = bench_augment(images, aug, args, device)
    tv_views = bench_torchvision(images_cpu, aug, args)

    # A few distinct real augmented batches, cycled through by the step timings.
    views = [aug(images[torch.randperm(len(images), device=device)[:args.batch_size]]) for _ in range(3)]
    home = "bf16" if cuda else "fp32"  # the variant train.py runs on this device
    step_ips, memory, e2e, shares = {}, {}, None, None
    for variant in VARIANTS:
        if (variant == "bf16" and not cuda) or (variant == "compile" and not args.compile):
            step_ips[variant] = memory[variant] = None
            continue
        release(device)
        pair = (images, aug) if variant == home else ()  # train.py's own variant: its loop body too
        step_ips[variant], ips, per_repeat, memory[variant] = bench_step(variant, views, args, device, *pair)
        if variant == home:
            e2e, shares = ips, per_repeat
        if variant == "compile":
            torch._dynamo.reset()
    release(device)
    graph = {} if not args.graph else {v: bench_graph(images, aug, args, device, compile=v == "graph_compile")
                                       for v in ("graph", "graph_compile")[:1 + args.compile]}
    data_s = bench_data_path(images, aug, args, device)
    streaming = bench_streaming(aug, args, device)
    flops = count_flops(images, aug, args, device)

    tflops = {v: None if ips is None else flops * ips / 1e12 for v, ips in step_ips.items()}
    fraction = None if peak is None else {v: None if t is None else t / peak for v, t in tflops.items()}
    result = dict(
        device=device.type, device_name=name, torch_version=torch.__version__, arch=args.arch,
        image_size=args.image_size, hidden_dim=args.hidden_dim, batch_size=args.batch_size, images=source,
        quick=args.quick, workers=args.workers, aug_threads=max(1, args.workers) if not cuda else None,
        aug_views_per_s=aug_views, torchvision_views_per_s=tv_views, aug_speedup=aug_views / tv_views,
        torchvision_antialias=True, augment_antialias=False, step_images_per_s=step_ips, end_to_end_variant=home,
        end_to_end_images_per_s=e2e, graph_images_per_s=graph, data_path_overhead=statistics.median(shares),
        data_path_overhead_repeats=shares, data_path_ms_per_batch=1e3 * data_s,
        data_path_share_alone=data_s / (data_s + args.batch_size / step_ips[home]),
        data_path_images_per_s=dict(in_memory=args.batch_size / data_s, streaming=streaming),
        flops_per_image=flops, tflops=tflops, peak_tflops=peak, peak_fraction=fraction,
        peak_memory_bytes=memory if cuda else None,
        max_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
        seconds=time.perf_counter() - t_start,
    )
    print_table(result, args)
    print(json.dumps(result))
    return result


def print_table(r, args):
    num = lambda x, fmt="{:,.0f}": "n/a" if x is None else fmt.format(x)
    threads = f"{r['aug_threads']} thread{'s' * (r['aug_threads'] != 1)}" if r["aug_threads"] else "GPU"
    print(f"BYOL bench on {r['device_name']} ({r['device']}), torch {r['torch_version']}")
    print(f"{r['arch']} at {r['image_size']} px, hidden {r['hidden_dim']}, batch {r['batch_size']}, "
          f"median of {args.repeats} x {args.steps} steps after {args.warmup} warm-up; {r['images']}")
    print(f"\n{'augmentation (2 views per image)':<48}{'views/s':>10}")
    print(f"{f'  Augment, batched on {args.device} ({threads})':<48}{num(r['aug_views_per_s']):>10}")
    print(f"{f'  torchvision v2 on PIL, {args.workers} DataLoader worker(s)':<48}{num(r['torchvision_views_per_s']):>10}")
    print(f"  Augment is {r['aug_speedup']:.1f}x the per-image pipeline (torchvision's resize antialiases, Augment's does not)")
    print(f"\n{'training step (byol_update)':<30}{'images/s':>10}{'TFLOP/s':>10}{'% peak':>9}{'peak mem':>11}")
    for v in VARIANTS:
        mem = (r["peak_memory_bytes"] or {}).get(v)
        pct = r["peak_fraction"][v] * 100 if r["peak_fraction"] and r["peak_fraction"][v] is not None else None
        skipped = "skipped (--compile)" if v == "compile" else "n/a on cpu"
        if r["step_images_per_s"][v] is None:
            print(f"  {v:<28}{skipped:>10}")
            continue
        print(f"  {v:<28}{num(r['step_images_per_s'][v]):>10}{num(r['tflops'][v], '{:.2f}'):>10}"
              f"{num(pct, '{:.1f}'):>9}{num(mem and mem / 2**30, '{:.2f} GiB'):>11}")
    print(f"\nend to end (index, aug, {r['end_to_end_variant']} step, as train.py): {num(r['end_to_end_images_per_s'])} "
          f"images/s; the data path costs {100 * r['data_path_overhead']:.1f}% of each step's time "
          f"(median of {args.repeats} back-to-back pairs)")
    for v, ips in r["graph_images_per_s"].items():
        print(f"end to end as one {'CUDA graph' if r['device'] == 'cuda' else 'graph-ready step'} ({v}): {num(ips)} images/s")
    print(f"data path alone (index, aug): {r['data_path_ms_per_batch']:.1f} ms per batch, "
          f"{100 * r['data_path_share_alone']:.1f}% of data path + {r['end_to_end_variant']} step")
    print(f"data path, images/s: in memory {num(r['data_path_images_per_s']['in_memory'])}; streaming from disk "
          f"with {args.workers} DataLoader worker(s) {num(r['data_path_images_per_s']['streaming'])}")
    print(f"FLOPs per image per step: {r['flops_per_image'] / 1e9:.2f} GFLOP; dense bf16 peak: "
          f"{num(r['peak_tflops'], '{:.0f} TFLOP/s')}; max RSS {r['max_rss_bytes'] / 2**30:.2f} GiB; "
          f"took {r['seconds']:.0f} s")


if __name__ == "__main__":
    cli(main, interrupted="\nStopped.")
