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
import re
import shutil
import signal
import socket
import stat
import tempfile
import time

import torch
from tqdm import tqdm

from machinery.devices import any_process, end_processes
from machinery.files import (RUNS, UserError, first_line, load_weights, open_to_append, quote, read_log, refuse_link,
                   remove_temporaries, save_atomic, save_json, save_lines)

CHECKPOINT_KEYS = ("online", "target", "predictor", "optimizer", "step", "perm", "rng", "config")
RUN_FILES = ("checkpoint.pt", "encoder.pt", "config.json", "log.jsonl")
SCRATCH = re.compile(r"\.time-trial-[a-z0-9_]{8}")  # --minutes' scratch folders (tempfile.mkdtemp's names)


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
        self.held, self.handlers, self.shown, self.saving = None, {}, {}, False

    def __enter__(self):
        trained_on = ((self.ckpt or {}).get("config") or {}).get("data_fingerprint")
        if trained_on and trained_on != self.batches.fingerprint:
            raise SystemExit(f"error: the images in --data {quote(self.cfg['data'])} are not the ones {self.out} "
                             f"was trained on (same count, other content): resume with the run's own data.")
        self.cfg["data_fingerprint"] = self.batches.fingerprint
        if self.master:  # once the data is there: a failed start leaves no run
            os.makedirs(self.out, exist_ok=True)
            self.held = lock(self.out)
            found = run_files(self.out)
            if not self.ckpt and {"checkpoint.pt", "encoder.pt"} & set(found):
                raise SystemExit(f"error: another training wrote a run into {self.out} while this one was "
                                 f"starting; pass another --out")
            if found:  # a run of ours: to resume, or to start again (it stopped before its first checkpoint)
                remove_leftovers(self.out)
            log = os.path.join(self.out, "log.jsonl")
            if self.ckpt:
                trim_log(log, self.ckpt["step"])
            elif os.path.isfile(log) and not os.path.islink(log):
                os.remove(log)                       # the log of the attempt that saved nothing
            save_json(self.cfg, os.path.join(self.out, "config.json"))  # a run of ours from here on
        return self

    def begin(self, total_steps):
        """Restores the checkpoint (a new run starts at 0), writes config.json, opens the log, starts the
        progress bar and takes Ctrl-C and SIGTERM. Returns the first step."""
        self.total_steps, seconds = total_steps, 0.0
        if self.ckpt:
            self.step, seconds = self.restore(self.ckpt)
        if self.world > 1:  # each process draws its own augmentations (the data order is shared: epoch_order)
            torch.manual_seed(self.cfg["seed"] + 1_000_003 * self.step + self.rank)
        self.saved_step, self.saved_at = self.step, time.perf_counter()
        self.monitor.reset()                                            # the sums and the clock start here
        if self.master:
            save_json(self.cfg, os.path.join(self.out, "config.json"))
            self.log_file = open_to_append(os.path.join(self.out, "log.jsonl"))
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
        """At the last step and on a signal; at an epoch's end once --save-minutes have passed since the
        last save (0: every epoch), as every process agrees."""
        if self.stopping or step == self.total_steps:
            return True
        waited = time.perf_counter() - self.saved_at >= 60 * self.cfg["save_minutes"]
        return self.end_of_epoch(step) and any_process(waited, self.world, self.device)

    def save(self, step):
        """checkpoint.pt and encoder.pt, when every parameter, BatchNorm statistic and optimizer state is
        finite: a good checkpoint is never replaced by a diverged one (Diverged)."""
        self.step = step
        if not self.finite():
            raise Diverged
        if self.master:
            self.write(self.out, step, time.perf_counter() - self.t_start)
        self.saved_step, self.saved_at = step, time.perf_counter()

    def finite(self):
        """True when the model's parameters and buffers (BatchNorm's running statistics) and the optimizer's
        state hold no NaN or Inf (one host sync)."""
        state = [v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        tensors = [t for t in (*self.model.parameters(), *self.model.buffers(), *state) if t.is_floating_point()]
        return bool(torch.stack([t.isfinite().all() for t in tensors]).all())

    def write(self, folder, step, seconds=0.0):
        """checkpoint.pt (everything needed to resume exactly) and encoder.pt (the encoder alone, a plain
        torchvision ResNet state_dict: README, "Use the encoder"), each written atomically."""
        rng = dict(cpu=torch.get_rng_state())
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        model, perm = self.model, self.batches.perm
        if perm is None:  # (the --minutes trial's save, before the first epoch's order is drawn)
            perm = torch.arange(len(self.batches.images))
        self.saving = True                             # a second Ctrl-C or SIGTERM waits for whole files
        try:
            save_atomic(dict(online=model.online.state_dict(), target=model.target.state_dict(),
                             predictor=model.predictor.state_dict(), optimizer=self.optimizer.state_dict(),
                             **self.monitor.state_dict(), epoch=step // self.batches.steps_per_epoch, step=step,
                             perm=perm.cpu(), rng=rng, seconds=seconds, config=self.cfg),
                        os.path.join(folder, "checkpoint.pt"))
            save_atomic(model.online.encoder.state_dict(), os.path.join(folder, "encoder.pt"))
        finally:
            self.saving = False
        if len(self.signals) > 1:
            self.stop_at_once()

    def scratch_save(self):
        """Writes a checkpoint into a scratch folder of the run folder, then removes it: what --minutes
        times (only the process that writes writes)."""
        if self.master:
            with tempfile.TemporaryDirectory(dir=self.out, prefix=".time-trial-") as scratch:
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
            self.optimizer.load_state_dict(optimizer_state(ckpt["optimizer"], self.optimizer))
            self.monitor.load_state_dict(ckpt)
            torch.set_rng_state(ckpt["rng"]["cpu"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"error: the checkpoint in {self.out} does not fit the model its config describes "
                             f"({type(e).__name__}: {first_line(e)})") from None
        if self.device.type == "cuda" and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], self.device)
        self.batches.perm = ckpt["perm"].to(self.device)
        if self.master:
            save_atomic(self.model.online.encoder.state_dict(), os.path.join(self.out, "encoder.pt"))
        return ckpt["step"], ckpt.get("seconds", 0.0)

    def on_signal(self, signum, frame):
        """Ctrl-C (SIGINT) or a cluster's preemption (SIGTERM): the step under way finishes, then the loop
        saves and stops. A second signal stops at once, or, during a save, as soon as its files are whole."""
        self.signals.append(signum)
        if len(self.signals) > 1 and not self.saving:
            self.stop_at_once()

    def stop_at_once(self):
        path = os.path.join(self.out, "checkpoint.pt")
        kept = (f"{path} from {time.strftime('%H:%M:%S', time.localtime(os.path.getmtime(path)))} is kept; "
                f"continue with: python train.py --resume {quote(self.out)}" if os.path.exists(path)
                else "no checkpoint had been saved yet, so there is nothing to resume")
        raise SystemExit(f"\nStopped at once by a second {signal.Signals(self.signals[-1]).name}: {kept}")

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
        return (f"error: training diverged: the loss, the weights or BatchNorm's running statistics became NaN "
                f"or Inf between steps "
                f"{self.saved_step + 1} and {self.step} (lr {self.lr:.3g}). The likely cause is a learning rate "
                f"too high for this batch size and optimizer: start again with a lower --base-lr"
                f"{' (or --optimizer sgd)' if self.cfg['optimizer'] == 'lars' else ''}. {kept}")


def optimizer_state(saved, optimizer):
    """A saved optimizer state as this code's optim.LARS loads it. Runs saved before --optimizer sgd ran
    on LARS hold torch.optim.SGD's (its momentum_buffer is LARS's v, and no group adapts), and runs saved
    before the clip existed lack it (their config says --no-lars-clip); both resume exactly."""
    groups = [{**optimizer.defaults, **group, "lars": group.get("lars", False) and now["lars"]}
              for group, now in zip(saved["param_groups"], optimizer.param_groups)]
    state = {i: {"v" if k == "momentum_buffer" else k: t for k, t in s.items()} for i, s in saved["state"].items()}
    return dict(state=state, param_groups=groups)


def run_files(out):
    """The files of a run that `out` already holds (links and folders of those names count too)."""
    return [f for f in RUN_FILES if os.path.lexists(os.path.join(out, f))]


def check_writable(out):
    """A clear error, before any work, when the run directory cannot be made and written: --out (or the
    nearest of its folders that exists) is a file or a link to nothing, or a folder this user cannot write."""
    parent = os.path.abspath(out)
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        what = "a link to nothing" if os.path.islink(parent) else "a file"
        raise SystemExit(f"error: --out {out}: {parent} is {what}, not a folder; pass a folder for the run")
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
        run_dir = os.path.dirname(path)
        if os.path.isfile(os.path.join(run_dir, "config.json")):
            raise SystemExit(f"error: {run_dir} holds a run that stopped before its first checkpoint, so there is "
                             f"nothing to resume. Start it again with the same command, without --resume (its "
                             f"flags are in {os.path.join(run_dir, 'config.json')}); the new run replaces it.")
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
    kill -9 included, so a dead run never holds it. A link or anything but a plain file named lock is
    refused, never opened through. Returns the open file: keep it."""
    path = os.path.join(run_dir, "lock")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666)
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.EISDIR):
            raise
        fd = None
    if fd is None or not stat.S_ISREG(os.fstat(fd).st_mode):
        if fd is not None:
            os.close(fd)
        raise SystemExit(f"error: {path} is not the plain file train.py locks (it is a link, a folder or a "
                         f"device), so it is not opened. Remove it (rm -r {quote(path)}) and run again.")
    f = os.fdopen(fd, "r+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = f.read().strip() or "another process"
        f.close()
        raise SystemExit(f"error: {run_dir} is in use: a training ({holder}) is writing to it. Wait for it "
                         f"to end, stop it, or train into another --out.") from None
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f


def remove_leftovers(run_dir):
    """Removes what a killed run of this project leaves half-written, and nothing else: the temporary
    files of its own files (files.remove_temporaries) and --minutes' scratch folders
    (.time-trial-XXXXXXXX, real folders only, never links)."""
    remove_temporaries(run_dir, RUN_FILES)
    for entry in os.scandir(run_dir):
        if SCRATCH.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)


def trim_log(path, step):
    """Keeps the lines of log.jsonl up to `step`, dropping a line cut short: a run resumed from a
    checkpoint re-runs the steps after it, and logs them again."""
    refuse_link(path)
    if os.path.isfile(path):
        save_lines([r for r in read_log(path) if isinstance(r.get("step"), (int, float)) and r["step"] <= step],
                   path)


def cli(main, interrupted="\nStopped before training began; nothing on disk was changed."):
    """Runs a script's main() as a command: a mistake the user can fix (files.UserError), a full or
    read-only disk, or memory running out ends in its message and a non-zero exit, never a traceback; so
    does Ctrl-C before the run takes its own signals (`interrupted` says what that left)."""
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
    except (MemoryError, RuntimeError) as e:  # torch's CPU and CUDA allocators raise RuntimeErrors
        if not isinstance(e, (MemoryError, torch.OutOfMemoryError)) and "can't allocate memory" not in str(e):
            raise
        raise SystemExit(f"error: out of memory ({first_line(e)}). Lower --batch-size (the lr follows it), "
                         f"--image-size or --hidden-dim, or add --stream for a dataset larger than memory.")
