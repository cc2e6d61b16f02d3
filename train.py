"""BYOL pretraining (Grill et al. 2020, arXiv 2006.07733), single file, top to bottom.

    python train.py                                   # CIFAR-10, ResNet-18, the recipe below
    python train.py --data path/to/train --epochs 3   # any ImageFolder
    python train.py --resume runs/<name>              # continue exactly where it stopped
"""
import argparse
import copy
import errno
import json
import math
import os
import shlex
import signal
import tempfile
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
from augment import STATS, Augment
from evaluation import features, knn_accuracy
from models import ARCHS, BYOL, STEMS, prepare, sync_batchnorm
from runs import (RUNS, SaveError, cache_dir, host_memory_available, load_weights, lock, newest_run,
                  remove_leftovers, save_atomic, save_json, start_processes, trim_log)

# ----------------------------------------------------------------------------------------------
# The recipe. "paper" = Grill et al. 2020 (ImageNet, Sec. 3.3 and Appendix C); the paper has no
# CIFAR setting, so CIFAR-10 values come from solo-learn's byol.yaml for CIFAR ResNet-18, the
# strongest public recipe (92.58% linear top-1 after 1000 epochs).
DEFAULTS = dict(
    dataset="cifar10",     # cifar10 | cifar100 | stl10; or --data pointing at an ImageFolder
    data="data",           # where torchvision downloads to, or an ImageFolder directory
    image_size=32,         # px; 32 for CIFAR, 96 for STL-10
    subset=None,           # train on a fixed random subset of this many images
    arch="resnet18",       # resnet18 | resnet50 (paper: ResNet-50)
    stem=None,             # None: CIFAR stem at <= 64 px, else ImageNet's; imagenet at 32 px = 8x cheaper CPU proxy
    hidden_dim=4096,       # projector and predictor hidden width (paper Sec. 3.3)
    proj_dim=256,          # projection size (paper Sec. 3.3)
    predictor=True,        # --no-predictor: the Table 5 ablation, which collapses
    epochs=1000,           # solo-learn (paper: 1000 on ImageNet)
    minutes=None,          # instead of --epochs: as many epochs as fit in this many minutes of training here
    batch_size=256,        # solo-learn (paper: 4096 on 512 TPU cores)
    optimizer="lars",      # lars (paper) | sgd
    base_lr=1.0,           # lr = base_lr * batch_size / 256; solo-learn (paper: 0.2)
    weight_decay=1e-5,     # solo-learn (paper: 1.5e-6)
    momentum=0.9,          # paper and solo-learn
    eta=0.02,              # LARS trust coefficient; solo-learn (paper: 1e-3)
    lars_clip=True,        # solo-learn's clip_lr: steps of min(trust, lr); --no-lars-clip: the paper's LARS
    warmup_epochs=10,      # linear warm-up, then cosine decay (paper); capped at a tenth of the run
    tau_base=0.99,         # EMA start, cosine to 1; solo-learn (paper: 0.996 on ImageNet)
    tau_schedule="cosine", # cosine (Sec. 3.3) | constant: tau_base throughout (Table 5a's tau = 0 row)
    blur=None,             # Gaussian blur; None = off at 32 px (solo-learn's CIFAR recipe), on above
    normalize="cifar10",   # the (mean, std) of augment.STATS the views and features are normalised with
    seed=0,
    device=None,           # cuda when available, else cpu
    compile=False,         # torch.compile the model
    log_every=50,          # steps between log.jsonl lines (the only host syncs in the loop)
    knn_every=10,          # epochs between test-split checks, kNN and online probe (and at the end); 0 = never
    test_subset=None,      # kNN queries: a fixed random subset of this many test images (default: all)
    probe_lr=0.1,          # online linear probe, its own SGD with momentum 0.9; solo-learn's classifier_lr
    collapse_z_std=0.01,   # warn when z_std stays below this for a whole log interval (healthy: 1/sqrt(proj_dim))
    workers=4,             # threads decoding an ImageFolder (once, then cached); --stream: DataLoader workers (0: none)
    stream=False,          # --stream: read an ImageFolder from disk every epoch, for sets larger than memory
    out=None,              # run directory; default runs/<time>-<dataset>-<arch>
    recipe="cifar10",      # cifar10: this block | imagenet: the paper's (IMAGENET below) in its place
)
# The paper's own recipe, ImageNet with ResNet-50 (Sec. 3.3, Appendix B and C): --recipe imagenet puts
# these in place of the values above; flags given on the command line still win. Not run here: see the
# README ("The paper's ImageNet recipe").
IMAGENET = dict(
    arch="resnet50",       # Sec. 3.3 (74.3% linear top-1, Table 1)
    image_size=224,        # Appendix B: crops resized to 224 x 224
    stem="imagenet",       # torchvision's ResNet-50 as it is
    batch_size=4096,       # Sec. 3.3: 4096, over 512 TPU v3 cores; the global batch under torchrun
    optimizer="lars",      # Sec. 3.3
    base_lr=0.2,           # Sec. 3.3: lr = 0.2 x batch / 256
    weight_decay=1.5e-6,   # Sec. 3.3
    eta=1e-3,              # Appendix C: LARS trust coefficient
    lars_clip=False,       # Appendix C: the paper's LARS, no clip
    epochs=1000,           # Sec. 3.3
    warmup_epochs=10,      # Sec. 3.3
    tau_base=0.996,        # Sec. 3.3
    blur=True,             # Appendix B, Table 6: blur p 1.0 (view 1) and 0.1 (view 2), kernel 23 px at 224
    normalize="imagenet",  # ImageNet's mean and std
    stream=True,           # 1.28M images at 224 px are about 190 GB as uint8: read from disk
    knn_every=0,           # the kNN monitor needs the training set in memory; the online probe remains
)
RECIPES = dict(cifar10={}, imagenet=IMAGENET)
# ----------------------------------------------------------------------------------------------
CHOICES = dict(dataset=data.DATASETS, arch=ARCHS, stem=STEMS, optimizer=("lars", "sgd"),
               tau_schedule=("cosine", "constant"), normalize=tuple(STATS), recipe=tuple(RECIPES))
# What each number must be: (the smallest value allowed, whether that value itself is allowed).
BOUNDS = dict(image_size=(8, True), subset=(1, True), test_subset=(1, True), hidden_dim=(1, True),
              proj_dim=(1, True), epochs=(1, True), minutes=(0, False), batch_size=(2, True), base_lr=(0, False),
              weight_decay=(0, True), momentum=(0, True), eta=(0, False), warmup_epochs=(0, True),
              tau_base=(0, True), log_every=(1, True), knn_every=(0, True), probe_lr=(0, False),
              collapse_z_std=(0, True), workers=(0, True))
# What a resumed run may change: how it runs and reports, not what its saved state means.
RESUMABLE = ("epochs", "data", "device", "compile", "log_every", "knn_every", "test_subset", "collapse_z_std",
             "workers", "stream", "out")
CHECKPOINT_KEYS = ("online", "target", "predictor", "optimizer", "step", "perm", "rng", "config")


def quote(path):
    """A path as it must be typed in a shell command (spaces and all)."""
    return shlex.quote(str(path))


def lr_at(step, total_steps, warmup_steps, peak_lr):
    """Sec. 3.3: linear warm-up to peak_lr over warmup_steps, then cosine decay to 0:
    lr_k = peak_lr * k / W for k < W, else peak_lr * (1 + cos(pi (k - W) / (K - W))) / 2."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def tau_at(step, total_steps, tau_base, schedule="cosine"):
    """Sec. 3.3 (Optimization): tau_k = 1 - (1 - tau_base) * (cos(pi k / K) + 1) / 2, from tau_base at k = 0 to 1 at K.
    tau_base = 1 keeps the target at its random initialisation (Table 5a, 18.8%). schedule="constant"
    keeps tau_base throughout: with 0, the target is the online network at every step (Table 5a, 0.3%)."""
    if schedule == "constant":
        return tau_base
    return 1 - (1 - tau_base) * (math.cos(math.pi * step / total_steps) + 1) / 2


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) in its two BYOL forms. With u = g + wd * w and m the momentum:

    clip=True, solo-learn's CIFAR recipe (solo/utils/lars.py with clip_lars_lr, the default here):
        trust = eta * ||w|| / (||g|| + wd * ||w|| + eps),   v <- m * v + min(trust / lr, 1) * u,
        w <- w - lr * v,   so each tensor steps by min(trust, lr) times its update.
    clip=False, the paper's (Appendix C; DeepMind's byol/utils/optimizers.py), --no-lars-clip:
        trust = eta * ||w|| / ||u||,   v <- m * v + trust * u,   w <- w - lr * v.

    Where ||w|| or the gradient's norm is 0, the update is left unscaled (and, clipped, without weight
    decay, as solo-learn). Groups with lars=False (biases and BatchNorm parameters, Appendix C) skip
    both the weight decay and the trust ratio: plain SGD with momentum. Every tensor of a group is
    updated at once with foreach ops, the per-tensor factors staying on the device.
    """

    def __init__(self, params, lr, weight_decay=0.0, momentum=0.9, eta=1e-3, clip=True, eps=1e-8):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta, lars=True,
                                      clip=clip, eps=eps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            w = [p for p in group["params"] if p.grad is not None]
            if not w:
                continue
            for p in w:
                if "v" not in self.state[p]:
                    self.state[p]["v"] = torch.zeros_like(p)
            v, g = [self.state[p]["v"] for p in w], [p.grad for p in w]
            lr, wd, eta = group["lr"], group["weight_decay"], group["eta"]
            torch._foreach_mul_(v, group["momentum"])
            if not group["lars"]:
                torch._foreach_add_(v, g)                                  # v <- m v + g
            elif group.get("clip", False):                                # (runs saved before clip existed)
                w_norm, g_norm = torch.stack(torch._foreach_norm(w)), torch.stack(torch._foreach_norm(g))
                ok = (w_norm > 0) & (g_norm > 0)
                trust = eta * w_norm / (g_norm + wd * w_norm + group.get("eps", 1e-8))
                scale = torch.where(ok, torch.clamp(trust / lr, max=1.0) if lr > 0 else 1.0, 1.0)
                u = torch._foreach_add(g, torch._foreach_mul(w, list((wd * ok).unbind())))  # g + wd w where ok
                torch._foreach_addcmul_(v, u, list(scale.unbind()))     # v <- m v + min(trust / lr, 1) u
            else:
                u = torch._foreach_add(g, w, alpha=wd)
                w_norm, u_norm = torch.stack(torch._foreach_norm(w)), torch.stack(torch._foreach_norm(u))
                trust = torch.where((w_norm > 0) & (u_norm > 0), eta * w_norm / u_norm, 1.0)
                torch._foreach_addcmul_(v, u, list(trust.unbind()))     # v <- m v + trust u
            torch._foreach_add_(w, v, alpha=-lr)                          # w <- w - lr v


def param_groups(model, weight_decay):
    """Appendix C: biases and BatchNorm parameters (every 1-D tensor) are excluded from weight decay
    and from LARS adaptation."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [dict(params=[p for p in params if p.ndim > 1], weight_decay=weight_decay, lars=True),
            dict(params=[p for p in params if p.ndim <= 1], weight_decay=0.0, lars=False)]


def make_optimizer(model, cfg):
    groups = param_groups(model, cfg["weight_decay"])
    if cfg["optimizer"] == "lars":
        return LARS(groups, lr=0.0, momentum=cfg["momentum"], eta=cfg["eta"], clip=cfg["lars_clip"])
    if cfg["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=cfg["momentum"])
    raise SystemExit(f"error: unknown --optimizer {cfg['optimizer']!r} (lars or sgd)")


def byol_update(model, forward, optimizer, view1, view2, lr, tau):
    """Algorithm 1 once the two views exist: the loss (Eq. 2, symmetrised), one optimizer step on
    theta (online + predictor) at learning rate lr, then the EMA of the target with tau (Eq. 1).
    forward is models.prepare(model, ...): it decides precision and memory format. Returns the
    detached loss, y1 and z1 (for the monitors)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss, y1, z1 = forward(view1, view2)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()                                  # theta <- optimizer(theta, grad L)
    model.update_target(tau)                          # xi <- tau xi + (1 - tau) theta
    return loss.detach(), y1, z1


def probe_update(probe, optimizer, y, labels):
    """Online linear probe (DeepMind's byol_experiment.py; solo-learn): one step of a linear classifier
    on the representation y (B x 512), cross-entropy on the batch's labels; images labelled -1 have
    none and are skipped. y is detached here, so no gradient can reach the encoder. Returns the
    numbers of correct and of labelled images as device tensors (no host sync)."""
    known = labels >= 0
    logits = probe(y.detach().float())                                   # B x classes
    loss = F.cross_entropy(logits, labels, ignore_index=-1, reduction="sum") / known.sum().clamp(min=1)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return ((logits.argmax(1) == labels) & known).sum(), known.sum()


def z_std(z):
    """Collapse monitor (SimSiam, Chen & He 2021, Sec. 4.1): the std over the batch of each dimension
    of z / ||z||, averaged over the d dimensions. About 1/sqrt(d) (0.0625 for d = 256) when the
    projections spread over the sphere; 0 when every image maps to the same point."""
    return F.normalize(z.float(), dim=1).std(0).mean()


class Monitor:
    """What the log reports, summed on the device as training runs and read (one host sync) only at
    logging time: images/s, the loss and z_std (mean and max over the log interval), and the online
    probe's hits (over the epoch)."""

    def __init__(self, device, batch_size):
        self.interval = torch.zeros(3, device=device)  # sum of loss, sum of z_std, max of z_std
        self.probe = torch.zeros(2, device=device)     # correct, labelled
        self.batch_size, self.steps, self.t = batch_size, 0, time.perf_counter()

    def add(self, loss, z, probe_hits=None):
        s = z_std(z)
        self.interval[:2] += torch.stack([loss.float(), s])
        torch.maximum(self.interval[2], s, out=self.interval[2])
        if probe_hits is not None:
            self.probe += torch.stack(probe_hits)
        self.steps += 1

    def read(self, end_of_epoch):
        """(steps since the last read, their figures: images/s and the means, and the probe's accuracy
        over the epoch at its end); resets."""
        (loss, s, s_max), (correct, labelled) = self.interval.tolist(), self.probe.tolist()
        steps, now = self.steps, time.perf_counter()
        out = dict(images_per_s=steps * self.batch_size / (now - self.t), loss=loss / steps, z_std=s / steps,
                   z_std_max=s_max)
        self.interval.zero_()
        self.steps, self.t = 0, now
        if end_of_epoch:
            if labelled:
                out["probe_top1"] = correct / labelled
            self.probe.zero_()
        return steps, out


def collapse_warning(z_std_max, threshold, proj_dim, first_step, last_step):
    """The warning to print when z_std stayed below threshold at every step of a log interval, else None.
    A random network is far from collapse (z_std near 1/sqrt(d) from step 0), so there is no warm-up
    grace: one whole interval under the threshold is already a collapse."""
    if z_std_max >= threshold:
        return None
    return (f"warning: the representation is collapsing: z_std stayed below {threshold} at every step "
            f"from {first_step} to {last_step} (at most {z_std_max:.4f}; healthy is about 1/sqrt({proj_dim}) "
            f"= {1 / math.sqrt(proj_dim):.4f}). Check the target's EMA (--tau-base; the recipe's 0.99), "
            f"the learning rate (--base-lr) and the predictor (--no-predictor removes it, the paper's "
            f"Table 5 row that collapses).")


def eval_on_test_split(encoder, probe, images, labels, test, device, stats=STATS["cifar10"]):
    """The monitors on the test split, encoder in eval mode (BN running statistics): weighted kNN
    top-1 (k = 200, t = 0.1; evaluation.py) with the labelled training images in memory as the bank,
    and the online probe's top-1, the figure solo-learn publishes as "Acc@1 (online)". Puts the
    encoder back in train mode."""
    known = labels >= 0
    bank, queries = features(encoder, images[known], device, stats=stats), features(encoder, test[0], device, stats=stats)
    out = dict(knn_top1=knn_accuracy(bank, labels[known], queries, test[1]))
    if probe is not None:
        with torch.no_grad():
            out["probe_test_top1"] = (probe(queries).argmax(1) == test[1]).float().mean().item()
    encoder.train()
    return out


def parse_args(argv):
    """Command-line flags override DEFAULTS (or the --recipe that replaces them). Returns (config, the
    flags given explicitly, --resume)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=argparse.SUPPRESS)
    for key, value in DEFAULTS.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool) or key == "blur":
            p.add_argument(flag, action=argparse.BooleanOptionalAction,
                           help="default: off at 32 px, on above" if key == "blur" else f"default {value}")
        else:
            kind = int if key in ("subset", "test_subset") else float if key == "minutes" else \
                {int: int, float: float}.get(type(value), str)
            p.add_argument(flag, type=kind, help=f"default {value}", choices=CHOICES.get(key))
    p.add_argument("--resume", nargs="?", const="latest",
                   help="a run directory or checkpoint to continue (no value: the newest run in runs/)")
    args = vars(p.parse_args(argv))
    resume = args.pop("resume", None)
    for key, value in args.items():
        low, inclusive = BOUNDS.get(key, (None, True))
        if low is not None and value is not None and (value < low or (value == low and not inclusive)):
            p.error(f"--{key.replace('_', '-')} {value}: must be {'at least' if inclusive else 'more than'} {low}"
                    + (" (BatchNorm needs 2 images per batch; the recipe uses 256)" if key == "batch_size" else ""))
    if args.get("tau_base", 0) > 1 or args.get("momentum", 0) >= 1:
        p.error("--tau-base must lie in [0, 1] and --momentum in [0, 1)")
    return {**DEFAULTS, **RECIPES[args.get("recipe", "cifar10")], **args}, args, resume


def configure(argv):
    """The run's config (DEFAULTS, then the flags; a resumed run's own recipe, then the flags given
    now, e.g. --device or --epochs to extend it) and its checkpoint (None for a new run). Checked here,
    before any data is decoded: the run directory can be written, a new run does not land in an old
    one, and a resumed run keeps the recipe its saved state means."""
    cfg, explicit, resume = parse_args(argv)
    if cfg["stream"] and cfg["minutes"]:
        raise SystemExit("error: --minutes times the in-memory path; with --stream, give --epochs")
    if not resume:
        source = os.path.basename(os.path.normpath(cfg["data"])) if data.is_image_folder(cfg["data"]) \
            else cfg["dataset"]
        cfg["out"] = cfg["out"] or os.path.join(RUNS, f"{time.strftime('%Y%m%d-%H%M%S')}-{source}-{cfg['arch']}")
        check_writable(cfg["out"])
        if run_files(cfg["out"]):
            raise SystemExit(f"error: {cfg['out']} already holds a run ({', '.join(run_files(cfg['out']))}). "
                             f"Continue it with: python train.py --resume {quote(cfg['out'])}\n"
                             f"or start the new run in another --out (or delete that folder first).")
        return cfg, None
    if "minutes" in explicit:
        raise SystemExit("error: --minutes plans a new run's schedule; a resumed run keeps its own "
                         "(--epochs N extends it)")
    ckpt, path = load_checkpoint(resume)
    saved = {**DEFAULTS, "lars_clip": False, **ckpt["config"]}  # (runs saved before --lars-clip: unclipped)
    changed = [f"--{k.replace('_', '-')} {v} (the run's: {saved.get(k)})" for k, v in explicit.items()
               if k not in RESUMABLE and v != saved.get(k)]
    if changed:
        raise SystemExit(f"error: a resumed run keeps the recipe its checkpoint was trained with, and these "
                         f"flags would change it: {'; '.join(changed)}. Resume without them, or start a new "
                         f"run with them in another --out.")
    cfg = {**saved, "device": None, **explicit, "out": os.path.dirname(path)}
    steps_per_epoch = len(ckpt["perm"]) // cfg["batch_size"]
    done = f"{cfg['out']} is at step {ckpt['step']} ({ckpt['step'] / steps_per_epoch:g} epochs)"
    if ckpt["step"] >= cfg["epochs"] * steps_per_epoch:
        if "epochs" in explicit:
            raise SystemExit(f"error: --epochs {cfg['epochs']} ends where the run already is: {done}. "
                             f"Pass more epochs to train it further.")
        print(f"Nothing to do: {done}, the end of its {cfg['epochs']} epochs. Extend it with --epochs N "
              f"(N > {cfg['epochs']}), or evaluate it with: python test.py {quote(cfg['out'])}")
        raise SystemExit(0)
    return cfg, ckpt


def run_files(out):
    """The files of a run that `out` already holds."""
    return [f for f in ("checkpoint.pt", "encoder.pt", "config.json", "log.jsonl")
            if os.path.exists(os.path.join(out, f))]


def check_writable(out):
    """A clear error, before any work, when the run directory cannot be made and written."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise SystemExit(f"error: --out {out} is a file, not a folder; pass a folder for the run")
    parent = os.path.abspath(out)
    while not os.path.isdir(parent):
        parent = os.path.dirname(parent)
    try:
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as e:
        raise SystemExit(f"error: cannot write the run to {out}: {parent} is not writable ({e.strerror}). "
                         f"Pass --out a folder you can write to.")


def load_checkpoint(resume):
    """(checkpoint dict, its path) from a run directory, a checkpoint.pt, or "latest". Loaded with
    weights_only=True: tensors and plain data only, so a checkpoint from elsewhere cannot run code."""
    path = newest_run() if resume == "latest" else resume
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.pt")
    if not os.path.isfile(path):
        raise SystemExit(f"error: no checkpoint at {path}; pass a run directory such as runs/<name>")
    ckpt = load_weights(path)
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt] if isinstance(ckpt, dict) else ["all of them"]
    if missing:
        raise SystemExit(f"error: {path} is not a checkpoint written by train.py: it lacks "
                         f"{', '.join(missing)} (of {', '.join(CHECKPOINT_KEYS)})")
    return ckpt, path


def load_data(cfg, device, rank=0, world=1):
    """The training set on the device as uint8 (augment.py makes the views there), its labels (-1 =
    none; only the monitors see them) and, for the kNN monitor, the labelled test split or None. With
    several processes, rank 0 decodes and caches first, the others then read its cache, and only rank
    0 keeps the test split (the monitors are rank 0's). With --stream, the training set is a
    data.StreamingFolder read from disk each epoch, and there is no kNN monitor (it needs the
    training images in memory as its bank)."""
    if cfg["stream"]:
        files = data.folder_files(cfg["data"], subset=cfg["subset"], seed=cfg["seed"])
        labels = torch.tensor([label for _, label in files], device=device)
        return data.StreamingFolder(files, cfg["image_size"]), labels, None
    check_fits(cfg, device)
    if world > 1 and rank > 0:
        torch.distributed.barrier()
    cache = cache_dir(cfg["out"])
    images, labels = data.load(cfg["data"], cfg["dataset"], "train", cfg["image_size"], cfg["subset"],
                               cfg["seed"], cache=cache, workers=cfg["workers"])
    if len(images) < cfg["batch_size"]:
        raise SystemExit(f"error: --batch-size {cfg['batch_size']} exceeds the {len(images)} training "
                         f"images; lower it or use more data")
    test = None
    if cfg["knn_every"] and (labels >= 0).any() and rank == 0:
        try:  # seed 0 whatever the run's seed: every run is scored on the same test images
            x, y = data.load(cfg["data"], cfg["dataset"], "test", cfg["image_size"], cfg["test_subset"],
                             0, cache=cache, workers=cfg["workers"])
            test = (x[y >= 0].to(device), y[y >= 0].to(device)) if (y >= 0).any() else None
        except data.DataError as e:
            print(f"note: no kNN monitor, as there is no labelled test split ({str(e).splitlines()[0]})")
    if world > 1 and rank == 0:
        torch.distributed.barrier()
    return images.to(device), labels.to(device), test


def check_fits(cfg, device):
    """Before decoding an ImageFolder into memory: a clear error, naming --stream, when the set would
    not fit (half of the device's free memory, and twice its size in the host's, for the decoding)."""
    if not data.is_image_folder(cfg["data"]):
        return  # CIFAR and STL-10: at most 2.7 GB
    n = cfg["subset"] or len(data.folder_files(cfg["data"]))
    need = data.in_memory_bytes(n, cfg["image_size"])
    host = host_memory_available()
    if host is None:  # no such figure on this system: do not guess
        return
    room = host / 2 if device.type != "cuda" else min(host, torch.cuda.mem_get_info(device)[0]) / 2
    if need > room:
        raise SystemExit(f"error: {n} images at {cfg['image_size']} px are {need / 2**30:.1f} GiB as uint8, more "
                         f"than fits in memory here ({room / 2**30:.1f} GiB: half the free memory of the "
                         f"{device.type} and of the host). Add --stream to read them from disk every epoch "
                         f"with DataLoader workers.")


def stream_batches(dataset, perm, start, cfg, rank, world, device):
    """The rest of one epoch from disk (--stream), one step at a time: DataLoader workers decode this
    process's share of every global batch of the epoch's order `perm` from step `start` on, and take
    two random resized crops of each; pinned, then copied to the device without blocking. The order
    is the shared epoch_order, not a DistributedSampler's, so a run resumes in the middle of an epoch."""
    order = perm.cpu()
    shares = [share_of(order, i, cfg["batch_size"], rank, world).tolist()
              for i in range(start, len(order) // cfg["batch_size"])]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=shares, num_workers=cfg["workers"],
                                         pin_memory=device.type == "cuda")
    for crops1, crops2 in loader:
        yield crops1.to(device, non_blocking=True), crops2.to(device, non_blocking=True)


def make_probe(dim, n_classes, cfg, device):
    """The online probe: its own Linear and optimizer (SGD as solo-learn's classifier, which shares the
    backbone's lr schedule; ours keeps probe_lr constant), so it can never move the encoder. (None,
    None) when the data has no labels."""
    if not n_classes:
        return None, None
    probe = torch.nn.Linear(dim, n_classes).to(device)
    return probe, torch.optim.SGD(probe.parameters(), lr=cfg["probe_lr"], momentum=0.9)


def restore(ckpt, model, optimizer, probe, probe_optimizer, n_images, device, out):
    """Loads a checkpoint's weights, optimizer, probe and RNG state, and rewrites encoder.pt from it (a
    kill between the two saves of an epoch leaves encoder.pt one epoch behind). Returns (step, the
    epoch's data order, the seconds of training so far)."""
    if len(ckpt["perm"]) != n_images:
        raise SystemExit(f"error: the data has {n_images} training images, but the run was trained on "
                         f"{len(ckpt['perm'])}: resume with the run's own data (--data, --subset).")
    try:
        model.online.load_state_dict(ckpt["online"])
        model.target.load_state_dict(ckpt["target"])
        model.predictor.load_state_dict(ckpt["predictor"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if probe is not None and ckpt.get("probe") is not None:
            probe.load_state_dict(ckpt["probe"])
            probe_optimizer.load_state_dict(ckpt["probe_optimizer"])
        torch.set_rng_state(ckpt["rng"]["cpu"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: the checkpoint in {out} does not fit the model its config describes "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if device.type == "cuda" and "cuda" in ckpt["rng"]:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
    if out:  # (None: not the process that writes)
        save_atomic(model.online.encoder.state_dict(), os.path.join(out, "encoder.pt"))
    return ckpt["step"], ckpt["perm"].to(device), ckpt.get("seconds", 0.0)


def save_checkpoint(out, cfg, model, optimizer, probe, probe_optimizer, step, perm, device, seconds=0.0):
    """checkpoint.pt (everything needed to resume exactly) and encoder.pt (the encoder alone, a plain
    torchvision ResNet state_dict: README, "Use the encoder"), each written atomically."""
    rng = dict(cpu=torch.get_rng_state())
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    save_atomic(dict(online=model.online.state_dict(), target=model.target.state_dict(),
                     predictor=model.predictor.state_dict(), optimizer=optimizer.state_dict(),
                     probe=probe.state_dict() if probe else None,
                     probe_optimizer=probe_optimizer.state_dict() if probe else None,
                     epoch=step // (len(perm) // cfg["batch_size"]),  # perm: one epoch's data order
                     step=step, perm=perm.cpu(), rng=rng, seconds=seconds,
                     config=cfg), os.path.join(out, "checkpoint.pt"))
    save_atomic(model.online.encoder.state_dict(), os.path.join(out, "encoder.pt"))


def epoch_order(n, seed, epoch, device):
    """The data order of one epoch, a permutation drawn from (seed, epoch) alone: every process draws
    the same one and takes its share of each global batch, and a resumed run draws what an unbroken
    one would."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).to(device)


def share_of(perm, i, batch_size, rank, world):
    """This process's part of the epoch's i-th global batch: the rank-th of its `world` equal parts."""
    share = batch_size // world
    return perm[i * batch_size:(i + 1) * batch_size][rank * share:(rank + 1) * share]


def agree(stop, finite, world, device):
    """(stop, finite) as every process must act on them: as they are in one process; with several (at log
    steps), stop when any process was signalled and finite only when every loss was, one all-reduce."""
    if world == 1:
        return stop, finite
    flags = torch.tensor([float(stop), float(not finite)], device=device)
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    return bool(flags[0]), not bool(flags[1])


def same_everywhere(value, world, device):
    """An integer as rank 0 has it, on every process (the --minutes plan)."""
    if world == 1:
        return value
    t = torch.tensor([value], device=device)
    torch.distributed.broadcast(t, src=0)
    return int(t)


def weights_finite(model):
    """True when every weight of the model (online, predictor, target) is finite (one host sync)."""
    return bool(torch.stack([p.isfinite().all() for p in model.parameters()]).all())


def diverged(step, first_step, lr, out, saved_step):
    """The message for a run whose loss or weights went NaN or Inf."""
    kept = (f"The last good checkpoint, of step {saved_step}, and its encoder are kept in {out}."
            if saved_step else "No checkpoint had been saved yet, so nothing is kept.")
    return (f"error: training diverged: the loss or the weights became NaN or Inf between steps {first_step} "
            f"and {step} (lr {lr:.3g}). The likely cause is a learning rate too high for this batch size and "
            f"optimizer: start again with a lower --base-lr (or --optimizer sgd). {kept}")


def stop_on_signals(out):
    """Ctrl-C (SIGINT) or a cluster's preemption (SIGTERM) finishes the step under way, then the loop
    saves and exits (the returned list becomes non-empty). A second signal stops at once."""
    stop = []

    def on_signal(signum, frame):
        if stop:
            path = os.path.join(out, "checkpoint.pt")
            kept = (f"{path} from {time.strftime('%H:%M:%S', time.localtime(os.path.getmtime(path)))} is kept; "
                    f"continue with: python train.py --resume {quote(out)}" if os.path.exists(path)
                    else "no checkpoint had been saved yet, so there is nothing to resume")
            raise SystemExit(f"\nStopped at once by a second {signal.Signals(signum).name}: {kept}")
        stop.append(signum)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    return stop


def fit_epochs(minutes, steps_per_epoch, knn_every, step_s, check_s, save_s):
    """The most epochs (at least 1) whose steps, checkpoints (one per epoch) and test-split checks
    (every knn_every epochs and at the end) fit in `minutes`. Returns (epochs, their planned seconds)."""
    def cost(epochs):
        checks = -(-epochs // knn_every) if knn_every and check_s else 0  # ceil: every knn_every, and the end
        return epochs * (steps_per_epoch * step_s + save_s) + checks * check_s
    epochs = 1
    while cost(epochs + 1) <= 60 * minutes:
        epochs += 1
    return epochs, cost(epochs)


def plan_minutes(cfg, steps_per_epoch, step_s, check_s, save_s):
    """fit_epochs for --minutes, said aloud. Returns (epochs, planned minutes)."""
    epochs, planned = fit_epochs(cfg["minutes"], steps_per_epoch, cfg["knn_every"], step_s, check_s, save_s)
    print(f"--minutes {cfg['minutes']:g}: a step takes {step_s:.3g} s here, a test-split check {check_s:.3g} s "
          f"and a checkpoint {save_s:.3g} s, so {epochs} epochs ({epochs * steps_per_epoch} steps, warm-up and "
          f"cosine schedules included) are planned to take {planned / 60:.1f} min")
    return epochs, planned / 60


def log_line(log, bar, shown, record):
    """Appends one record to log.jsonl and shows its latest figures on the progress bar."""
    log.write(json.dumps(record) + "\n")
    log.flush()
    shown.update({k: f"{record[k]:.4f}" for k in ("loss", "z_std", "probe_top1", "knn_top1", "probe_test_top1")
                  if k in record})
    bar.set_postfix(**shown, lr=f"{record['lr']:.3g}", tau=f"{record['tau']:.4f}")


def open_run(out, ckpt):
    """Makes the run directory and locks it for this process (runs.lock), removes what a killed run left
    half-written, and on resume drops the log lines after the checkpoint, whose steps run again."""
    os.makedirs(out, exist_ok=True)
    held = lock(out)
    if not ckpt and run_files(out):
        raise SystemExit(f"error: another training wrote a run into {out} while this one was starting; "
                         f"pass another --out")
    remove_leftovers(out)
    if ckpt:
        trim_log(os.path.join(out, "log.jsonl"), ckpt["step"])
    return held


def time_trial(cfg, model, forward, optimizer, probe, probe_optimizer, aug, images, labels, test, device,
               share=None, master=True):
    """Seconds per training step (data path, Algorithm 1 and the monitors, timed after three warm-up
    steps, so after compiling), per test-split check and per checkpoint, on the real model with lr 0.
    The model, optimizer, probe and RNG are then put back exactly as they were."""
    saved = copy.deepcopy([m.state_dict() for m in (model, optimizer, probe, probe_optimizer) if m is not None])
    rng = (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    monitor = Monitor(device, cfg["batch_size"])

    def step():
        batch = torch.randint(len(images), (share or cfg["batch_size"],), device=device)
        loss, y1, z1 = byol_update(model, forward, optimizer, *aug(images[batch]), 0.0, cfg["tau_base"])
        monitor.add(loss, z1, probe_update(probe, probe_optimizer, y1, labels[batch]) if probe else None)

    def seconds(fn):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0
    for _ in range(3):
        step()
    steps, elapsed = 0, 0.0
    while steps < 3 or elapsed < 1.0:  # at least 3 steps and a second
        elapsed, steps = elapsed + seconds(step), steps + 1
    check_s = 0.0
    if test:
        check_s = seconds(lambda: eval_on_test_split(model.online.encoder, probe, images, labels, test, device,
                                                     (aug.mean, aug.std)))
    save_s = 0.0
    if master:  # (only rank 0 writes)
        with tempfile.TemporaryDirectory(dir=cfg["out"], prefix="time-trial-") as scratch:
            save_s = seconds(lambda: save_checkpoint(scratch, cfg, model, optimizer, probe, probe_optimizer, 0,
                                                     torch.arange(len(images)), device))
    for m, state in zip([m for m in (model, optimizer, probe, probe_optimizer) if m is not None], saved):
        m.load_state_dict(state)
    torch.set_rng_state(rng[0])
    if rng[1] is not None:
        torch.cuda.set_rng_state(rng[1], device)
    return elapsed / steps, check_s, save_s


def main(argv=None):
    cfg, ckpt = configure(argv)
    # One process per device under torchrun (rank 0 alone writes, logs and prints); else just this one.
    device, rank, world = start_processes(cfg["device"])
    master, share = rank == 0, cfg["batch_size"] // world                # share: images per process per step
    if cfg["batch_size"] % world:
        raise SystemExit(f"error: --batch-size {cfg['batch_size']} (the global batch) must split evenly over "
                         f"the {world} processes")
    cfg["device"] = str(device)
    torch.manual_seed(cfg["seed"])
    out = cfg["out"]

    # Data: the training set on the device as uint8 (--stream: read from disk); the test split for the monitors.
    images, labels, test = load_data(cfg, device, rank, world)
    steps_per_epoch = len(images) // cfg["batch_size"]
    held = open_run(out, ckpt) if master else None  # once the data is there: a failed start leaves no run

    # Model: online, target and predictor (Sec. 3.1); precision and memory format decided here, once.
    stats = STATS[cfg["normalize"]]
    aug = Augment(cfg["image_size"], cfg["blur"], *stats)
    model = BYOL(cfg["arch"], cfg["image_size"], cfg["hidden_dim"], cfg["proj_dim"], cfg["predictor"],
                 cfg["stem"]).to(device)
    if world > 1:
        model = sync_batchnorm(model, device)                            # BN over the global batch
    forward = prepare(model, device, compile=cfg["compile"], distributed=world > 1)
    optimizer = make_optimizer(model, cfg)
    probe, probe_optimizer = make_probe(model.online.projector[0].in_features, int(labels.max()) + 1, cfg,
                                        device) if master else (None, None)
    if cfg["minutes"]:  # --minutes: time this machine first, then fit the whole schedule in the budget
        times = time_trial(cfg, model, forward, optimizer, probe, probe_optimizer, aug, images, labels, test,
                           device, share, master)
        cfg["epochs"], cfg["planned_minutes"] = plan_minutes(cfg, steps_per_epoch, *times)
        cfg["epochs"] = same_everywhere(cfg["epochs"], world, device)

    # Schedule (Sec. 3.3): one step per batch, linear lr scaling, the warm-up capped at a tenth of the run.
    total_steps = cfg["epochs"] * steps_per_epoch
    warmup_steps = min(cfg["warmup_epochs"] * steps_per_epoch, total_steps // 10)
    peak_lr = cfg["base_lr"] * cfg["batch_size"] / 256
    step, perm, seconds = (restore(ckpt, model, optimizer, probe, probe_optimizer, len(images), device,
                                   out if master else None) if ckpt else (0, None, 0.0))
    if world > 1:  # each process draws its own augmentations (the data order is shared: epoch_order)
        torch.manual_seed(cfg["seed"] + 1_000_003 * step + rank)
    if master:
        save_json(cfg, os.path.join(out, "config.json"))

    log = open(os.path.join(out, "log.jsonl"), "a") if master else None
    monitor, warned, shown = Monitor(device, cfg["batch_size"]), False, {}
    bar = tqdm(total=total_steps, initial=step, desc=os.path.basename(out), unit="step", dynamic_ncols=True,
               disable=not master)
    stop, stopping, saved_step, healthy, loader = stop_on_signals(out), False, step, True, None
    model.train()
    t_start = time.perf_counter() - seconds                              # seconds of training, resumes included
    # Algorithm 1, one iteration per step k.
    while step < total_steps and not stopping:
        i = step % steps_per_epoch
        if i == 0 or perm is None:
            perm = epoch_order(len(images), cfg["seed"], step // steps_per_epoch, device)
        if cfg["stream"] and (i == 0 or loader is None):
            loader = stream_batches(images, perm, i, cfg, rank, world, device)
        lr = lr_at(step, total_steps, warmup_steps, peak_lr)            # Sec. 3.3, cosine lr
        tau = tau_at(step, total_steps, cfg["tau_base"], cfg["tau_schedule"])  # Sec. 3.3, cosine tau
        batch = share_of(perm, i, cfg["batch_size"], rank, world)
        x = next(loader) if cfg["stream"] else images[batch]              # uint8 (--stream: 2 crops of each)
        view1, view2 = aug(x)                                            # v ~ T(x), v' ~ T'(x)
        loss, y1, z1 = byol_update(model, forward, optimizer, view1, view2, lr, tau)
        step += 1
        # Monitors, outside Algorithm 1: the online probe on y1 and the collapse monitor on z1.
        hits = probe_update(probe, probe_optimizer, y1, labels[batch]) if probe else None
        monitor.add(loss, z1, hits)
        bar.update()
        end_of_epoch = step % steps_per_epoch == 0 or step == total_steps
        at_log = step % cfg["log_every"] == 0 or end_of_epoch
        if at_log or (stop and world == 1):                              # the loop's only host syncs
            steps, figures = monitor.read(end_of_epoch)
            stopping, finite = agree(bool(stop), math.isfinite(figures["loss"]), world, device)
            if not finite:                                               # NaN or Inf: stop, save nothing
                healthy = False
                break
        if master and (at_log or stopping):
            record = dict(epoch=step / steps_per_epoch, step=step, lr=lr, tau=tau, **figures,
                          minutes=(time.perf_counter() - t_start) / 60)
            epoch = step // steps_per_epoch
            if test and end_of_epoch and not stopping and (epoch % cfg["knn_every"] == 0 or step == total_steps):
                record.update(eval_on_test_split(model.online.encoder, probe, images, labels, test, device, stats))
            log_line(log, bar, shown, record)
            warning = collapse_warning(record["z_std_max"], cfg["collapse_z_std"], cfg["proj_dim"],
                                       step - steps + 1, step)
            if warning and not warned:
                tqdm.write(warning)
                warned = True
        if end_of_epoch or stopping:
            if not weights_finite(model):                                # a good checkpoint is never replaced
                healthy = False
                break
            if master:
                save_checkpoint(out, cfg, model, optimizer, probe, probe_optimizer, step, perm, device,
                                time.perf_counter() - t_start)
            saved_step = step
    bar.close()
    if master:
        log.close()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if world > 1:
        torch.distributed.destroy_process_group()
    launch = "python" if world == 1 else f"torchrun --nproc_per_node {world}"
    if not healthy:  # (the other processes stop with rank 0, quietly)
        raise SystemExit(diverged(step, saved_step + 1, lr, out, saved_step) if master else 1)
    if stopping:
        raise SystemExit(f"\nStopped by {signal.Signals(stop[0]).name if stop else 'a signal to another process'} "
                         f"at step {step}/{total_steps}; saved {out}/checkpoint.pt. Continue with: {launch} "
                         f"train.py --resume {quote(out)}" if master else 1)
    if not master:
        return out
    cfg["train_minutes"] = (time.perf_counter() - t_start) / 60
    save_json(cfg, os.path.join(out, "config.json"))                     # the real time beside the planned
    held.close()
    print(f"Done in {cfg['train_minutes']:.1f} min of training: {out}/encoder.pt. "
          f"Evaluate with: python test.py {quote(out)}")
    return out


if __name__ == "__main__":
    try:
        main()
    except (data.DataError, SaveError) as e:
        raise SystemExit(f"error: {e}")
    except OSError as e:  # the log on a full or read-only disk (checkpoints raise SaveError)
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        raise SystemExit(f"error: cannot write {e.filename or 'to the run directory'}: {e.strerror}. Every "
                         f"checkpoint already written is kept; free space, then --resume.")
    except KeyboardInterrupt:  # before the loop, whose own handler takes Ctrl-C
        raise SystemExit("\nStopped before training began; nothing on disk was changed.")
