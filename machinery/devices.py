"""Where and how the networks run: the device (cuda or cpu), torchrun's processes (DDP, BatchNorm over
the global batch, the processes' agreements), and precision and memory format (bf16 autocast and
channels_last on CUDA, torch.compile). Decided here, once, so that Algorithm 1's update does not."""
import builtins
import ctypes
import os
import shutil

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel


def pick_device(name=None):
    """torch.device(name), or cuda when PyTorch sees a GPU and cpu otherwise. A name that is no device
    here (--device foo, cuda without a GPU, cuda:3 on a machine with one) is the user's mistake, said
    plainly. On the CPU, also keep_freed_memory()."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise SystemExit(f"error: --device {name!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name}, but PyTorch sees no CUDA GPU here; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise SystemExit(f"error: --device {name}, but PyTorch sees {torch.cuda.device_count()} GPU(s) here")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"error: --device {name}: this project runs on cpu or cuda")
    if device.type == "cpu":
        keep_freed_memory()
    return device


def compiler_missing(name=None):
    """For --compile, before any work: why torch.compile cannot build its kernels on the device `name`
    (None: the one pick_device takes), or None when it can. On the CPU, inductor compiles C++ with $CXX or
    g++; on CUDA, Triton builds its launchers with $CC, gcc or clang. Without one, compiling fails at the
    first step, after a long wait, in a traceback."""
    cuda = (name or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    names = [os.environ.get("CC")] if cuda and os.environ.get("CC") else ["gcc", "clang"] if cuda else \
        [os.environ.get("CXX") or "g++"]
    if any(shutil.which(n) for n in names):
        return None
    return (f"--compile needs a {'C' if cuda else 'C++'} compiler to build its kernels ({' or '.join(names)}), and "
            f"none is on PATH here. Install one (e.g. apt install {'gcc' if cuda else 'g++'}), set "
            f"{'CC' if cuda else 'CXX'} to one, or leave out --compile.")


def start_processes(name=None):
    """torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK) made into a process group: NCCL on GPUs,
    one GPU per process, and gloo on the CPU. Returns (device, rank, world size); a plain `python
    train.py` is (pick_device(name), 0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    device = pick_device(name)
    if world == 1:
        return device, 0, 1
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.get_rank() > 0:  # only rank 0 prints (as torchvision's reference scripts do)
        builtins.print = lambda *args, **kwargs: None
    return device, dist.get_rank(), world


def end_processes(world):
    if world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world):
    if world > 1:
        dist.barrier()


def any_process(flag, world, device):
    """True when `flag` is true in any process (one all-reduce), as every process must act on it alike:
    stop when any was signalled, stop when any loss is NaN. In one process, the flag itself."""
    if world == 1:
        return bool(flag)
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t)


def same_everywhere(value, world, device):
    """An integer as rank 0 has it, on every process (the --minutes plan)."""
    if world == 1:
        return value
    t = torch.tensor([value], device=device)
    dist.broadcast(t, src=0)
    return int(t)


def synchronize(device):
    """Waits for the device's queued work (to time it); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_memory_available():
    """Bytes of memory the host can still give (Linux's MemAvailable, which counts the page cache as
    free), or None where /proc/meminfo does not say."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def keep_freed_memory():
    """glibc hands every freed buffer over 128 KiB back to the OS and page-faults it in again at the
    next allocation, which makes each fresh batch-sized tensor cost several times its arithmetic on a
    CPU. Raising the two thresholds keeps freed buffers for reuse, as PyTorch's caching allocator
    does on CUDA (bench.py shows the difference in the augmentation). A no-op without glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 256 << 20)   # M_MMAP_THRESHOLD: buffers up to 256 MiB come from the heap
    libc.mallopt(-1, 512 << 20)   # M_TRIM_THRESHOLD: keep up to 512 MiB of freed heap


def autocast(device, enabled=None, graphed=False):
    """bf16 autocast on CUDA, off elsewhere: a speed choice of ours (neither the paper's text nor DeepMind's
    byol code casts to bfloat16; docs/recipe.md). Under a CUDA graph the casts of the weights are made
    afresh at each replay: autocast's cache of them would hold tensors the graph does not own (PyTorch's
    CUDA graph notes)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" if enabled is None
                          else enabled, cache_enabled=False if graphed else None)


def prepare(model, device, compile=False, channels_last=None, bf16=None, distributed=False, graphed=False):
    """Returns forward(view1, view2) running `model` as it should run on `device`: on CUDA with
    channels_last weights and views and bf16 autocast (each can be forced on or off, as bench.py
    does), optionally torch.compile'd; with distributed=True (torchrun), BatchNorm over the global
    batch (sync_batchnorm, in place) and PyTorch's DistributedDataParallel, which averages the
    gradients of every process before the optimizer step; graphed=True for a step replayed as a CUDA
    graph (StepGraph). train.byol_update just calls it."""
    cuda = device.type == "cuda"
    fmt = torch.channels_last if (cuda if channels_last is None else channels_last) else torch.contiguous_format
    model.to(memory_format=fmt)
    net = model
    if distributed:
        sync_batchnorm(model, device)
        net = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    net = torch.compile(net) if compile else net
    precision = autocast(device, bf16, graphed)

    def forward(view1, view2):
        with precision:
            return net(view1.contiguous(memory_format=fmt), view2.contiguous(memory_format=fmt))
    return forward


def sync_batchnorm(model, device):
    """Every BatchNorm of the model over the global batch of all processes, in place, as DeepMind's code
    computes BN over its whole batch of 4096 across TPU cores (byol/configs/byol.py: cross_replica_axis; the
    paper's text does not say): PyTorch's nn.SyncBatchNorm on GPUs, and on the CPU, where nn.SyncBatchNorm
    does not run, GlobalBatchNorm, the same computation over gloo. Each keeps the original's parameters
    and buffers."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            bn = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine)
            bn.weight, bn.bias = child.weight, child.bias   # the same tensors: the target's stay frozen
            bn.running_mean, bn.running_var = child.running_mean, child.running_var
            bn.num_batches_tracked = child.num_batches_tracked
            setattr(model, name, bn)
        else:
            sync_batchnorm(child, device)
    return model


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BN whose training statistics are the mean and (biased) variance over every process's batch. The
    sums go through AllReduceSum, whose backward all-reduces the gradient, so the gradients are those
    of one BN over the whole global batch. Running statistics as nn.BatchNorm's (unbiased variance);
    evaluation uses them and talks to no other process."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected a batch of at least 2-D inputs, got {x.dim()}-D")

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        dims, shape = [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2)
        n = x.numel() // x.shape[1] * dist.get_world_size()             # values per channel, all processes
        mean = AllReduceSum.apply(x.sum(dims)) / n
        centred = x - mean.view(shape)
        var = AllReduceSum.apply((centred * centred).sum(dims)) / n
        with torch.no_grad():
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1), self.momentum)
            self.num_batches_tracked += 1
        return centred * torch.rsqrt(var + self.eps).view(shape) * self.weight.view(shape) + self.bias.view(shape)


class AllReduceSum(torch.autograd.Function):
    """The sum of a tensor over all processes; its gradient is likewise summed over all processes, since
    every process's loss depends on the sum."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class StepGraph:
    """One training step, step(x, labels, lr, tau), captured once as a CUDA graph and replayed at every
    call after: the augmentation, both networks' forward and backward passes, LARS, the EMA, the online
    probe and the monitors' sums become one launch instead of thousands (the step at 32 px is bound by
    launches: docs/speed.md). A graph reads the memory it was captured with, so its inputs are static
    buffers: the batch and its labels are copied in, and lr and tau are written into device tensors
    before each replay (a Python float would be frozen into the graph). The first `warmup` calls run
    eagerly on a side stream (cuDNN picks its kernels, the optimizers make their state), the next one
    captures, and every call does one real step. Equal to the eager step: the same ops on the same
    values (a test compares them on the CPU, where a call runs the step eagerly on the same buffers)."""

    def __init__(self, step, device, warmup=2):
        self.step, self.device, self.warmup, self.calls, self.graph = step, device, warmup, 0, None

    def __call__(self, x, labels, lr, tau):
        if self.calls == 0:  # the static buffers, shaped by the first batch
            self.x, self.labels = torch.empty_like(x), torch.empty_like(labels)
            self.lr = torch.zeros((), device=self.device)
            self.tau = torch.zeros((), dtype=torch.float64, device=self.device)  # 1 - tau near 0 keeps its digits
        self.x.copy_(x, non_blocking=True)
        self.labels.copy_(labels, non_blocking=True)
        self.lr.fill_(lr)
        self.tau.fill_(tau)
        self.calls += 1
        if self.device.type != "cuda":
            return self.step(self.x, self.labels, self.lr, self.tau)
        if self.graph is None and self.calls <= self.warmup:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self.step(self.x, self.labels, self.lr, self.tau)
            return torch.cuda.current_stream(self.device).wait_stream(side)
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # recorded, not run: the replay below runs this step
                self.step(self.x, self.labels, self.lr, self.tau)
        self.graph.replay()
