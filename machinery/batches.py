"""What each training step reads: the training set on the device as uint8 (with --stream, read from
disk by DataLoader workers instead), one data order per epoch that every process shares, and this
process's share of each global batch; the labelled test split the monitors score; and the fingerprint
of the training images that a resumed run checks."""
import atexit
import hashlib
import os
import signal
from functools import partial

import torch

from machinery import data
from machinery.devices import barrier, host_memory_available
from machinery.files import UserError, cache_dir, first_line

SAMPLED = 64  # files whose bytes enter an ImageFolder's fingerprint, beside every file's name and size


class WorkerLost(UserError):
    """A --stream DataLoader worker ended from outside (the out-of-memory killer, kill -9) while step `step`'s
    batch was awaited: every step before it is whole, so its weights may be saved (runs.Run)."""

    def __init__(self, step, why):
        super().__init__(f"a --stream DataLoader worker ended from outside ({why}); the likely cause is memory: "
                         f"lower --workers or --batch-size")
        self.step, self.why = step, why


class Batches:
    """Step k's batch: epoch k // S's data order (epoch_order), its (k mod S)-th global batch of
    --batch-size images, and this process's share of it (S = steps_per_epoch). perm is the current
    epoch's order, which checkpoints save; fingerprint says what the images hold (a resumed run checks it)."""

    def __init__(self, images, labels, cfg, rank, world, device, fingerprint=None):
        self.images, self.labels, self.cfg, self.device, self.fingerprint = images, labels, cfg, device, fingerprint
        self.rank, self.world = rank, world
        self.steps_per_epoch = len(images) // cfg["batch_size"]
        self.perm, self.loader = None, None

    def at(self, step):
        """(x, labels) of step `step`: uint8 images on the device (--stream: two crops of each, data.py),
        and their labels (-1: none; only the monitors read them)."""
        i = step % self.steps_per_epoch
        if i == 0 or self.perm is None:
            self.perm = epoch_order(len(self.images), self.cfg["seed"], step // self.steps_per_epoch, self.device)
        if self.cfg["stream"] and (i == 0 or self.loader is None):
            self.loader = stream_batches(self.images, self.perm, i, self.cfg, self.rank, self.world, self.device)
        batch = share_of(self.perm, i, self.cfg["batch_size"], self.rank, self.world)
        if not self.cfg["stream"]:
            return self.images[batch], self.labels[batch]
        try:
            return next(self.loader), self.labels[batch]
        except WorkerLost as e:
            e.step = step
            raise

    def close(self):
        """Ends the --stream workers of the epoch under way (a run that stops mid-epoch)."""
        if self.loader is not None:
            self.loader.close()
            self.loader = None

    def random(self):
        """A batch of this process's size drawn at random from the images in memory (the --minutes trial)."""
        batch = torch.randint(len(self.images), (self.cfg["batch_size"] // self.world,), device=self.device)
        return self.images[batch], self.labels[batch]


def training_data(cfg, device, rank=0, world=1):
    """(Batches of the training set, the labelled test split for the kNN monitor or None). In memory,
    the training images sit on the device as uint8 (augment.py makes the views there) with their
    labels (-1 = none). With several processes, rank 0 decodes and caches first, the others then read
    its cache, and only rank 0 keeps the test split (the monitors are rank 0's). With --stream, the
    training set is a data.StreamingFolder read from disk each epoch, and there is no kNN monitor (it
    needs the training images in memory as its bank)."""
    if cfg["batch_size"] % world:
        raise SystemExit(f"error: --batch-size {cfg['batch_size']} (the global batch) must split evenly over "
                         f"the {world} processes")
    if cfg["stream"]:
        files = data.folder_files(cfg["data"], subset=cfg["subset"], seed=cfg["seed"])
        labels = torch.tensor([label for _, label in files], device=device)
        return Batches(data.StreamingFolder(files, cfg["image_size"], (cfg["crop_min_scale"], 1)), labels, cfg, rank,
                       world, device, fingerprint(files)), None
    check_fits(cfg, device)
    if rank > 0:
        barrier(world)
    cache = cache_dir(cfg["cache_dir"])
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
    if rank == 0:
        barrier(world)
    made = fingerprint(data.folder_files(cfg["data"], subset=cfg["subset"], seed=cfg["seed"])) \
        if data.holds_images(cfg["data"]) else \
        "pixels:" + hashlib.blake2b(images.contiguous().numpy(), digest_size=8).hexdigest()   # CIFAR's binaries
    return Batches(images.to(device), labels.to(device), cfg, rank, world, device, made), test


def fingerprint(files):
    """What an ImageFolder's training files [(path, label)] are, computed the same way by the in-memory and the
    --stream path, so that a run resumes on either: every file's class/name and size, and the bytes of SAMPLED
    files spread evenly over the list (cheap at ImageNet's size, where reading every file would take an epoch).
    Names are taken from the class folder down: the same images moved elsewhere match."""
    h, every = hashlib.blake2b(digest_size=8), max(1, len(files) // SAMPLED)
    for i, (path, _) in enumerate(files):
        try:
            size = os.path.getsize(path)
        except OSError as e:  # gone since it was listed
            raise data.unreadable(path, e) from None
        h.update(repr((os.path.basename(os.path.dirname(path)), os.path.basename(path), size)).encode())
        if i % every == 0:
            h.update(data.read_bytes(path))
    return "files:" + h.hexdigest()


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


def epoch_order(n, seed, epoch, device):
    """The data order of one epoch, a permutation drawn from (seed, epoch) alone: every process draws
    the same one and takes its share of each global batch, and a resumed run draws what an unbroken
    one would."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).to(device)


def share_of(perm, i, batch_size, rank, world):
    """This process's part of the epoch's i-th global batch: the rank-th of its `world` equal parts."""
    share = batch_size // world
    return perm[i * batch_size:(i + 1) * batch_size][rank * share:(rank + 1) * share]


def stream_batches(dataset, perm, start, cfg, rank, world, device):
    """The rest of one epoch from disk (--stream), one step at a time: DataLoader workers decode this
    process's share of every global batch of the epoch's order `perm` from step `start` on, and take
    two random resized crops of each; pinned, then copied to the device without blocking. The order
    is the shared epoch_order, not a DistributedSampler's, so a run resumes in the middle of an epoch.
    An image a worker cannot read ends the run with data.py's one-paragraph DataError naming it. The
    workers end with the generator (closed, finished, or at exit: end_workers)."""
    order = perm.cpu()
    shares = [share_of(order, i, cfg["batch_size"], rank, world).tolist()
              for i in range(start, len(order) // cfg["batch_size"])]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=shares, num_workers=cfg["workers"],
                                         pin_memory=device.type == "cuda", worker_init_fn=ignore_signals)
    batches = iter(loader)
    ending = partial(end_workers, getattr(batches, "_workers", []))   # (torch's worker processes)
    atexit.register(ending)
    if cfg["workers"]:  # torch's SIGCHLD handler raises where the main process happens to be, mid-step;
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # without it, a lost worker is found below, between steps
    try:
        for crops1, crops2 in batches:
            yield crops1.to(device, non_blocking=True), crops2.to(device, non_blocking=True)
    except data.DataError as e:  # from a worker, its message is "Caught DataError in DataLoader worker process
        # N.\nOriginal Traceback ...\nmachinery.data.DataError: <ours>\n" (torch/_utils.py, ExceptionWrapper.reraise)
        raise data.DataError(str(e).rpartition(f"\n{data.__name__}.DataError: ")[2].strip()) from None
    except RuntimeError as e:  # "DataLoader worker (pid(s) N) exited unexpectedly" (torch's _try_get_data)
        if "DataLoader worker" not in str(e):
            raise
        codes = [w.exitcode for w in getattr(batches, "_workers", []) if w.exitcode]
        signals = [signal.Signals(-c).name for c in codes if -c in signal.valid_signals()]
        raise WorkerLost(None, first_line(e) + (f", by {', '.join(signals)}" if signals else "")) from None
    finally:
        ending()
        atexit.unregister(ending)


def end_workers(workers):
    """Ends --stream workers at once (SIGKILL; they hold nothing to save). They ignore SIGTERM (ignore_signals),
    which is how DataLoader and multiprocessing's own exit handler end them, so without this a process that
    stops mid-epoch would wait for them forever as it exits."""
    for w in workers:
        if w.is_alive():
            w.kill()
        w.join()


def ignore_signals(worker_id):
    """A --stream worker ignores Ctrl-C and SIGTERM, which a terminal, SLURM or torchrun send to every process
    of the job: the main process alone decides to stop, saves a checkpoint at the signal, and ends its workers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
