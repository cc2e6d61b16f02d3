"""A run's life on disk. runs/<name>/ holds config.json (the resolved recipe), checkpoint.pt
(everything needed to resume), encoder.pt (the online encoder alone), log.jsonl (one line per log
interval), eval.json (test.py's figures) and lock. Run is one training's hold on its folder, from the
lock to the last message: new or resumed, log lines, checkpoints, Ctrl-C and SIGTERM, the NaN guard.
cli() is how each script ends on an expected mistake: a message and a non-zero exit, no traceback."""
import errno
import fcntl
import json
import math
import os
import shutil
import signal
import socket
import tempfile
import time

import torch
from tqdm import tqdm

from devices import any_process, end_processes
from files import RUNS, UserError, load_weights, quote, read_log, save_atomic, save_json, save_lines

CHECKPOINT_KEYS = ("online", "target", "predictor", "optimizer", "step", "perm", "rng", "config")


class Diverged(Exception):
    """The loss or the weights became NaN or Inf (Run turns it into its message)."""


class Run:
    """One training's hold on its run folder, as a context manager. On entry (the process that writes,
    rank 0): the folder is made and locked, a killed run's leftovers removed and, on resume, the log
    lines after the checkpoint dropped. begin() restores the checkpoint and starts the log, the progress
    bar and the signal handlers; the loop then asks log_due / save_due and calls log / save. On exit:
    "Done", or why it stopped and how to continue, or, after a NaN, which checkpoint is kept."""

    def __init__(self, cfg, ckpt, model, optimizer, monitor, batches, device, rank=0, world=1):
        self.cfg, self.ckpt, self.model, self.optimizer, self.monitor = cfg, ckpt, model, optimizer, monitor
        self.batches, self.device, self.rank, self.world = batches, device, rank, world
        self.master, self.out = rank == 0, cfg["out"]
        self.signals, self.stopping, self.step, self.lr, self.bar, self.log_file = [], False, 0, 0.0, None, None
        self.held, self.handlers, self.shown = None, {}, {}

    def __enter__(self):
        if self.master:  # once the data is there: a failed start leaves no run
            os.makedirs(self.out, exist_ok=True)
            self.held = lock(self.out)
            if not self.ckpt and run_files(self.out):
                raise SystemExit(f"error: another training wrote a run into {self.out} while this one was "
                                 f"starting; pass another --out")
            remove_leftovers(self.out)
            if self.ckpt:
                trim_log(os.path.join(self.out, "log.jsonl"), self.ckpt["step"])
        return self

    def begin(self, total_steps):
        """Restores the checkpoint (a new run starts at 0), writes config.json, opens the log, starts the
        progress bar and takes Ctrl-C and SIGTERM. Returns the first step."""
        self.total_steps, seconds = total_steps, 0.0
        if self.ckpt:
            self.step, seconds = self.restore(self.ckpt)
        if self.world > 1:  # each process draws its own augmentations (the data order is shared: epoch_order)
            torch.manual_seed(self.cfg["seed"] + 1_000_003 * self.step + self.rank)
        self.saved_step = self.step
        if self.master:
            save_json(self.cfg, os.path.join(self.out, "config.json"))
            self.log_file = open(os.path.join(self.out, "log.jsonl"), "a")
        self.bar = tqdm(total=total_steps, initial=self.step, desc=os.path.basename(self.out), unit="step",
                        dynamic_ncols=True, disable=not self.master)
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.handlers[signum] = signal.signal(signum, self.on_signal)
        self.t_start = time.perf_counter() - seconds                    # seconds of training, resumes included
        return self.step

    def end_of_epoch(self, step):
        return step % self.batches.steps_per_epoch == 0 or step == self.total_steps

    def log_due(self, step):
        """True at a log step (every --log-every steps and at each epoch's end) and, in one process, at
        the first step after Ctrl-C or SIGTERM. There the processes agree whether to stop (one all-reduce)."""
        if not (step % self.cfg["log_every"] == 0 or self.end_of_epoch(step) or (self.signals and self.world == 1)):
            return False
        self.stopping = any_process(bool(self.signals), self.world, self.device)
        return True

    def log(self, step, **record):
        """Appends one record to log.jsonl and shows its figures on the progress bar. A loss that is NaN or
        Inf in any process stops the run, with nothing saved (Diverged)."""
        self.step, self.lr = step, record["lr"]
        if any_process(not math.isfinite(record["loss"]), self.world, self.device):
            raise Diverged
        if not self.master:
            return
        record = dict(epoch=step / self.batches.steps_per_epoch, step=step, **record,
                      minutes=(time.perf_counter() - self.t_start) / 60)
        self.log_file.write(json.dumps(record) + "\n")
        self.log_file.flush()
        self.shown.update({k: f"{record[k]:.4f}" for k in ("loss", "z_std", "probe_top1", "knn_top1",
                                                           "probe_test_top1") if k in record})
        self.bar.set_postfix(**self.shown, lr=f"{record['lr']:.3g}", tau=f"{record['tau']:.4f}")

    def save_due(self, step):
        return self.end_of_epoch(step) or self.stopping

    def save(self, step):
        """checkpoint.pt and encoder.pt, when every weight is finite: a good checkpoint is never replaced
        by a diverged one (Diverged)."""
        self.step = step
        if not bool(torch.stack([p.isfinite().all() for p in self.model.parameters()]).all()):
            raise Diverged
        if self.master:
            self.write(self.out, step, time.perf_counter() - self.t_start)
        self.saved_step = step

    def write(self, folder, step, seconds=0.0):
        """checkpoint.pt (everything needed to resume exactly) and encoder.pt (the encoder alone, a plain
        torchvision ResNet state_dict: README, "Use the encoder"), each written atomically."""
        rng = dict(cpu=torch.get_rng_state())
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        model, perm = self.model, self.batches.perm
        if perm is None:  # (the --minutes trial's save, before the first epoch's order is drawn)
            perm = torch.arange(len(self.batches.images))
        save_atomic(dict(online=model.online.state_dict(), target=model.target.state_dict(),
                         predictor=model.predictor.state_dict(), optimizer=self.optimizer.state_dict(),
                         **self.monitor.state_dict(), epoch=step // self.batches.steps_per_epoch, step=step,
                         perm=perm.cpu(), rng=rng, seconds=seconds, config=self.cfg),
                    os.path.join(folder, "checkpoint.pt"))
        save_atomic(model.online.encoder.state_dict(), os.path.join(folder, "encoder.pt"))

    def scratch_save(self):
        """Writes a checkpoint into a scratch folder of the run folder, then removes it: what --minutes
        times (only the process that writes writes)."""
        if self.master:
            with tempfile.TemporaryDirectory(dir=self.out, prefix="time-trial-") as scratch:
                self.write(scratch, 0)

    def restore(self, ckpt):
        """Loads a checkpoint's weights, optimizer, probe, data order and RNG state, and rewrites encoder.pt
        from it (a kill between the two saves of an epoch leaves encoder.pt one epoch behind). Returns
        (step, the seconds of training so far)."""
        n_images = len(self.batches.images)
        if len(ckpt["perm"]) != n_images:
            raise SystemExit(f"error: the data has {n_images} training images, but the run was trained on "
                             f"{len(ckpt['perm'])}: resume with the run's own data (--data, --subset).")
        try:
            self.model.online.load_state_dict(ckpt["online"])
            self.model.target.load_state_dict(ckpt["target"])
            self.model.predictor.load_state_dict(ckpt["predictor"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.monitor.load_state_dict(ckpt)
            torch.set_rng_state(ckpt["rng"]["cpu"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"error: the checkpoint in {self.out} does not fit the model its config describes "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        if self.device.type == "cuda" and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], self.device)
        self.batches.perm = ckpt["perm"].to(self.device)
        if self.master:
            save_atomic(self.model.online.encoder.state_dict(), os.path.join(self.out, "encoder.pt"))
        return ckpt["step"], ckpt.get("seconds", 0.0)

    def on_signal(self, signum, frame):
        """Ctrl-C (SIGINT) or a cluster's preemption (SIGTERM): the step under way finishes, then the loop
        saves and stops. A second signal stops at once."""
        if self.signals:
            path = os.path.join(self.out, "checkpoint.pt")
            kept = (f"{path} from {time.strftime('%H:%M:%S', time.localtime(os.path.getmtime(path)))} is kept; "
                    f"continue with: python train.py --resume {quote(self.out)}" if os.path.exists(path)
                    else "no checkpoint had been saved yet, so there is nothing to resume")
            raise SystemExit(f"\nStopped at once by a second {signal.Signals(signum).name}: {kept}")
        self.signals.append(signum)

    def __exit__(self, kind, error, traceback):
        if self.bar is not None:
            self.bar.close()
        if self.log_file is not None:
            self.log_file.close()
        for signum, handler in self.handlers.items():
            signal.signal(signum, handler)
        finished = kind is None and not self.stopping
        if finished and self.master:
            self.cfg["train_minutes"] = (time.perf_counter() - self.t_start) / 60
            save_json(self.cfg, os.path.join(self.out, "config.json"))  # the real time beside the planned
        if self.held is not None:
            self.held.close()
        end_processes(self.world)
        launch = "python" if self.world == 1 else f"torchrun --nproc_per_node {self.world}"
        if kind is Diverged:  # (the other processes stop with rank 0, quietly)
            raise SystemExit(self.diverged() if self.master else 1) from None
        if kind is None and self.stopping:
            by = signal.Signals(self.signals[0]).name if self.signals else "a signal to another process"
            raise SystemExit(f"\nStopped by {by} at step {self.step}/{self.total_steps}; saved {self.out}/"
                             f"checkpoint.pt. Continue with: {launch} train.py --resume {quote(self.out)}"
                             if self.master else 1)
        if finished and self.master:
            print(f"Done in {self.cfg['train_minutes']:.1f} min of training: {self.out}/encoder.pt. "
                  f"Evaluate with: python test.py {quote(self.out)}")
        return False

    def diverged(self):
        """The message for a run whose loss or weights went NaN or Inf."""
        kept = (f"The last good checkpoint, of step {self.saved_step}, and its encoder are kept in {self.out}."
                if self.saved_step else "No checkpoint had been saved yet, so nothing is kept.")
        return (f"error: training diverged: the loss or the weights became NaN or Inf between steps "
                f"{self.saved_step + 1} and {self.step} (lr {self.lr:.3g}). The likely cause is a learning rate "
                f"too high for this batch size and optimizer: start again with a lower --base-lr (or "
                f"--optimizer sgd). {kept}")


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


def newest_run(runs=RUNS):
    """The run directory in `runs` whose checkpoint.pt was written last."""
    dirs = [os.path.join(runs, d) for d in os.listdir(runs)] if os.path.isdir(runs) else []
    dirs = [d for d in dirs if os.path.isfile(os.path.join(d, "checkpoint.pt"))]
    if not dirs:
        raise SystemExit(f"error: no run with a checkpoint.pt in {runs}/; train one with: python train.py")
    return max(dirs, key=lambda d: os.path.getmtime(os.path.join(d, "checkpoint.pt")))


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
        save_lines([r for r in read_log(path) if r.get("step", 0) <= step], path)


def cli(main, interrupted="\nStopped before training began; nothing on disk was changed."):
    """Runs a script's main() as a command: a mistake the user can fix (files.UserError), or a full or
    read-only disk, ends in its message and a non-zero exit, never a traceback; so does Ctrl-C before
    the run takes its own signals (`interrupted` says what that left)."""
    try:
        main()
    except UserError as e:
        raise SystemExit(f"error: {e}")
    except OSError as e:  # a log on a full or read-only disk (checkpoints raise SaveError)
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        raise SystemExit(f"error: cannot write {e.filename or 'to the run directory'}: {e.strerror}. Every "
                         f"checkpoint already written is kept; free space, then --resume.")
    except KeyboardInterrupt:
        raise SystemExit(interrupted)
