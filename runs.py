"""What a run leaves on disk, and where it runs. runs/<name>/ holds config.json (the resolved recipe),
checkpoint.pt (everything needed to resume), encoder.pt (the online encoder alone), log.jsonl (one
line per log interval) and eval.json (test.py's figures); runs/.cache holds decoded datasets."""
import ctypes
import json
import os

import torch

RUNS = "runs"


def cache_dir(run_dir=None):
    """Decoded datasets are cached in .cache beside the run directories (runs/.cache by default)."""
    parent = os.path.dirname(os.path.abspath(run_dir)) if run_dir else RUNS
    return os.path.join(parent, ".cache")


def pick_device(name=None):
    """torch.device(name), or cuda when PyTorch sees a GPU and cpu otherwise; asking for cuda without
    one is the user's mistake, said plainly. On the CPU, also keep_freed_memory()."""
    if name and name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name}, but PyTorch sees no CUDA GPU here; use --device cpu")
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        keep_freed_memory()
    return device


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


def save_atomic(obj, path):
    """torch.save to a temporary file, then rename: a crash mid-write never leaves a broken file."""
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def newest_run(runs=RUNS):
    """The run directory in `runs` whose checkpoint.pt was written last."""
    dirs = [os.path.join(runs, d) for d in os.listdir(runs)] if os.path.isdir(runs) else []
    dirs = [d for d in dirs if os.path.isfile(os.path.join(d, "checkpoint.pt"))]
    if not dirs:
        raise SystemExit(f"error: no run with a checkpoint.pt in {runs}/; train one with: python train.py")
    return max(dirs, key=lambda d: os.path.getmtime(os.path.join(d, "checkpoint.pt")))


def read_config(run_dir):
    """The run's config.json as a dict ({} when there is none)."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def read_log(path):
    """The records of a log.jsonl, skipping a line cut short by a crash."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records
