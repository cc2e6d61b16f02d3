"""What a run leaves on disk, and where it runs. runs/<name>/ holds config.json (the resolved recipe),
checkpoint.pt (everything needed to resume), encoder.pt (the online encoder alone), log.jsonl (one
line per log interval) and eval.json (test.py's figures); runs/.cache holds decoded datasets."""
import builtins
import ctypes
import errno
import fcntl
import json
import os
import pickle
import shutil
import socket

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
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if torch.distributed.get_rank() > 0:  # only rank 0 prints (as torchvision's reference scripts do)
        builtins.print = lambda *args, **kwargs: None
    return device, torch.distributed.get_rank(), world


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


class SaveError(Exception):
    """A file that could not be written (a full disk, a read-only folder); printed without a traceback."""


def save_atomic(obj, path, write=None):
    """write(obj, file) into path.tmp, then rename: a crash mid-write never leaves a broken file. A
    write that fails (a full disk) removes its partial file, keeps the previous file as it was and
    raises SaveError saying why. The file is opened here, in Python, so that a full disk surfaces as
    ENOSPC rather than as a C++ error from torch.save."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            (write or torch.save)(obj, f)
        os.replace(tmp, path)
    except BaseException as e:
        folder = os.path.dirname(os.path.abspath(path))
        full = isinstance(e, OSError) and e.errno == errno.ENOSPC
        free = shutil.disk_usage(folder).free if full else None  # read before the partial file goes
        if os.path.exists(tmp):
            os.remove(tmp)
        if not isinstance(e, OSError):
            raise
        why = (f"the disk holding {folder} is full ({free / 2**20:.0f} MiB free with the partial file)" if full
               else e.strerror or str(e))
        raise SaveError(f"Could not write {path}: {why}. The partial file is removed and the previous "
                        f"{os.path.basename(path)}, if there was one, is kept.") from None


def load_weights(path):
    """torch.load with weights_only=True: tensors and plain data only, so that a file from elsewhere
    cannot run code. A refused or unreadable file is a clear error, not a traceback."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise SystemExit(f"error: refused to load {path}: it holds Python objects besides tensors and plain "
                         f"data, and loading those can run code. This project writes tensors and plain data "
                         f"only; load only files you trust.") from None
    except Exception as e:
        raise SystemExit(f"error: {path} cannot be read; it may be truncated or not a file this project "
                         f"wrote ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def save_json(obj, path):
    """A JSON file, written atomically like the checkpoints."""
    save_atomic(obj, path, write=lambda o, f: f.write(json.dumps(o, indent=2).encode()))


def lock(run_dir):
    """Holds run_dir/lock while this process lives, so that a second training cannot write into the
    same run. The lock is the operating system's (flock), freed when the process ends in any way,
    kill -9 included, so a dead run never holds it. Returns the open file: keep it."""
    f = open(os.path.join(run_dir, "lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise SystemExit(f"error: {run_dir} is in use: a training ({holder}) is writing to it. Wait for it "
                         f"to end, stop it, or train into another --out.") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f


def remove_leftovers(run_dir):
    """Removes what a killed process leaves half-written: *.tmp files and time-trial scratch folders."""
    for entry in os.scandir(run_dir):
        if entry.name.endswith(".tmp") and entry.is_file():
            os.remove(entry.path)
        elif entry.name.startswith("time-trial-") and entry.is_dir():
            shutil.rmtree(entry.path, ignore_errors=True)


def trim_log(path, step):
    """Keeps the lines of log.jsonl up to `step`, dropping a line cut short: a run resumed from a
    checkpoint re-runs the steps after it, and logs them again."""
    if os.path.isfile(path):
        kept = [r for r in read_log(path) if r.get("step", 0) <= step]
        save_atomic(kept, path, write=lambda rs, f: f.write("".join(json.dumps(r) + "\n" for r in rs).encode()))


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
