"""A run's life on disk. runs/<name>/ holds config.json (the resolved recipe), checkpoint.pt
(everything needed to resume), encoder.pt (the online encoder alone), log.jsonl (one line per log
interval), eval.json (test.py's figures) and lock. Run is one training's hold on its folder, from the
lock to the last message: new or resumed, log lines, checkpoints, Ctrl-C and SIGTERM, the NaN guard,
a lost --stream worker. cli() is how each script ends on an expected mistake: a message and a non-zero
exit, no traceback. Whose a folder is, the lock and the leftovers: folders.py."""
import errno
import json
import math
import os
import signal
import tempfile
import time

import torch
from tqdm import tqdm

from machinery.batches import WorkerLost
from machinery.devices import any_process, end_processes
from machinery.files import UserError, first_line, open_to_append, quote, save_atomic, save_json
from machinery.folders import (FORMAT, MARK, RUN_FILES, drop_lock, is_run_folder, lock, new_run_check,
                               remove_leftovers, trim_log)


class Diverged(Exception):
    """The loss or the weights became NaN or Inf (Run turns it into its message)."""


class Run:
    """One training's hold on its run folder, as a context manager. On entry: a resumed run's checkpoint
    is loaded into memory (refused, before anything is written, when it does not fit or is not finite),
    Ctrl-C and SIGTERM are taken, and the process that writes (rank 0) makes, locks and cleans the folder
    and marks it as ours (config.json's MARK). begin() starts the log, the progress bar and the clock; the
    loop then asks log_due / save_due and calls log / save. On exit: "Done", or why it stopped and how to
    continue, or, after a NaN or a lost --stream worker, which checkpoint is kept."""

    def __init__(self, cfg, ckpt, model, optimizer, monitor, batches, device, rank=0, world=1):
        self.cfg, self.ckpt, self.model, self.optimizer, self.monitor = cfg, ckpt, model, optimizer, monitor
        self.batches, self.device, self.rank, self.world = batches, device, rank, world
        self.master, self.out = rank == 0, cfg["out"]
        self.signals, self.stopping, self.step, self.lr, self.bar, self.log_file = [], False, 0, 0.0, None, None
        self.held, self.handlers, self.shown, self.saving, self.seconds, self.fresh = None, {}, {}, False, 0.0, False

    def __enter__(self):
        trained_on = ((self.ckpt or {}).get("config") or {}).get("data_fingerprint")
        if isinstance(trained_on, str) and ":" not in trained_on:   # (runs saved before "files:" and "pixels:")
            print("note: this run's checkpoint fingerprints its images in an older way, so they are not checked")
        elif trained_on and trained_on != self.batches.fingerprint:
            raise SystemExit(f"error: the images in --data {quote(self.cfg['data'])} are not the ones {self.out} "
                             f"was trained on (other names, sizes or content): resume with the run's own data.")
        self.cfg["data_fingerprint"], self.cfg[MARK] = self.batches.fingerprint, FORMAT
        if self.ckpt:
            self.restore(self.ckpt)                          # into memory only: nothing is written yet
        for signum in (signal.SIGINT, signal.SIGTERM):       # a signal from here on is noted, then saved at
            self.handlers[signum] = signal.signal(signum, self.on_signal)
        try:
            if self.master:  # once the data is there: a failed start leaves no run
                self.claim()
        except BaseException:
            if self.held is not None and self.fresh and not is_run_folder(self.out):
                drop_lock(self.held, self.out)               # ours alone: a lock left would refuse the next run
            self.release()
            raise
        return self

    def claim(self):
        """Makes and locks the run folder, re-checks under the lock that a new run clashes with nothing (another
        start, a user's files), removes a killed run's leftovers (only in a run folder of ours), drops the log
        lines past the checkpoint, and writes config.json with its MARK, and encoder.pt from the checkpoint (a
        kill between the two saves of an epoch leaves encoder.pt one epoch behind)."""
        os.makedirs(self.out, exist_ok=True)
        ours = bool(self.ckpt) or is_run_folder(self.out)  # (a resumed run's checkpoint shows whose folder it is)
        self.held, self.fresh = lock(self.out, ours), not ours    # fresh: made here, new (O_EXCL)
        if not self.ckpt:   # again, under the lock (ours, so not among the names): another start, a user's files
            new_run_check(self.out, quiet=True, names=RUN_FILES)
        if ours:
            remove_leftovers(self.out)
        log = os.path.join(self.out, "log.jsonl")
        if self.ckpt:
            trim_log(log, self.ckpt["step"])
        elif ours and os.path.isfile(log) and not os.path.islink(log):
            os.remove(log)                       # the log of the attempt that saved nothing
        save_json(self.cfg, os.path.join(self.out, "config.json"))  # a run of ours from here on
        if self.ckpt:
            save_atomic(self.model.online.encoder.state_dict(), os.path.join(self.out, "encoder.pt"))

    def begin(self, total_steps):
        """Starts at the restored step (0 for a new run): config.json rewritten (--minutes' plan), the log
        opened, the progress bar and the clock started. A signal noted since the start (during the --minutes
        trial) stops the run before its first step. Returns the first step."""
        self.total_steps = total_steps
        if self.world > 1:  # each process draws its own augmentations (the data order is shared: epoch_order)
            torch.manual_seed(self.cfg["seed"] + 1_000_003 * self.step + self.rank)
        self.saved_step, self.saved_at = self.step, time.perf_counter()
        self.monitor.reset()                                            # the sums and the clock start here
        if self.master:
            save_json(self.cfg, os.path.join(self.out, "config.json"))
            self.log_file = open_to_append(os.path.join(self.out, "log.jsonl"))
        self.bar = tqdm(total=total_steps, initial=self.step, desc=os.path.basename(self.out), unit="step",
                        dynamic_ncols=True, disable=not self.master)
        self.t_start = time.perf_counter() - self.seconds               # seconds of training, resumes included
        self.stopping = any_process(bool(self.signals), self.world, self.device)
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
        """Loads a checkpoint's weights, optimizer, probe, data order and RNG state into memory; one that does
        not fit the model, or that holds NaN or Inf, is refused before anything is written."""
        n_images = len(self.batches.images)
        if len(ckpt["perm"]) != n_images:
            raise SystemExit(f"error: the data has {n_images} training images, but the run was trained on "
                             f"{len(ckpt['perm'])}: resume with the run's own data (--data, --subset).")
        try:
            self.model.online.load_state_dict(ckpt["online"])
            self.model.target.load_state_dict(ckpt["target"])
            self.model.predictor.load_state_dict(ckpt["predictor"])
            self.optimizer.load_state_dict(optimizer_state(ckpt["optimizer"], self.optimizer))
            if self.monitor.probe is not None and ckpt.get("probe") is not None:
                ckpt = dict(ckpt, probe_optimizer=own_groups(ckpt["probe_optimizer"], self.monitor.probe_optimizer))
            self.monitor.load_state_dict(ckpt)
            torch.set_rng_state(ckpt["rng"]["cpu"])
            if self.device.type == "cuda" and "cuda" in ckpt["rng"]:
                torch.cuda.set_rng_state(ckpt["rng"]["cuda"], self.device)
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            raise SystemExit(f"error: the checkpoint in {self.out} does not fit the model its config describes "
                             f"({type(e).__name__}: {first_line(e)}); nothing was written") from None
        if not self.finite():
            raise SystemExit(f"error: the checkpoint in {self.out} holds NaN or Inf (in its weights, BatchNorm "
                             f"statistics or optimizer state): the run that saved it had diverged, so it cannot go "
                             f"on. Nothing was written; start a new run (with a lower --base-lr).")
        self.batches.perm = ckpt["perm"].to(self.device)
        self.step, self.seconds = ckpt["step"], ckpt.get("seconds", 0.0)

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

    def release(self):
        """The --stream workers ended; the progress bar, the log and the lock closed; the signal handlers put back."""
        self.batches.close()
        for thing in (self.bar, self.log_file, self.held):
            if thing is not None:
                thing.close()
        for signum, handler in self.handlers.items():
            signal.signal(signum, handler)
        self.held, self.handlers = None, {}

    def __exit__(self, kind, error, traceback):
        for thing in (self.bar, self.log_file):
            if thing is not None:
                thing.close()
        self.bar = self.log_file = None
        finished = kind is None and not self.stopping
        if finished and self.master:
            self.cfg["train_minutes"] = (time.perf_counter() - self.t_start) / 60
            save_json(self.cfg, os.path.join(self.out, "config.json"))  # the real time beside the planned
        lost = self.worker_lost(error) if kind is WorkerLost else None  # (saves first, under the lock)
        self.release()
        end_processes(self.world)
        launch = "python" if self.world == 1 else f"torchrun --nproc_per_node {self.world}"
        if kind is Diverged or lost:  # (the other processes stop with rank 0, quietly)
            raise SystemExit((lost or self.diverged()) if self.master else 1) from None
        if kind is None and self.stopping:
            by = signal.Signals(self.signals[0]).name if self.signals else "a signal to another process"
            if not self.master:
                raise SystemExit(1)
            if self.step == 0:
                raise SystemExit(f"\nStopped by {by} before the first step (during the --minutes trial), so "
                                 f"nothing was trained or saved. Start the run again with the same command; "
                                 f"it replaces what {self.out} holds of it.")
            raise SystemExit(f"\nStopped by {by} at step {self.step}/{self.total_steps}; saved {self.out}/"
                             f"checkpoint.pt. Continue with: {launch} train.py --resume {quote(self.out)}")
        if finished and self.master:
            print(f"Done in {self.cfg['train_minutes']:.1f} min of training: {self.out}/encoder.pt. "
                  f"Evaluate with: python test.py {quote(self.out)}")
        return False

    def worker_lost(self, error):
        """The message for a --stream worker ended from outside, after saving the weights of the step it
        stopped at when they are finite (every step before it is whole, so a resume stays exact)."""
        self.step = error.step
        if self.master and self.finite():
            self.write(self.out, error.step, time.perf_counter() - self.t_start)
            kept = (f"The weights of step {error.step} are saved in {self.out}/checkpoint.pt; continue with: "
                    f"python train.py --resume {quote(self.out)}")
        else:
            kept = "The weights in memory hold NaN or Inf, so they are not saved. " + self.kept()
        return (f"error: a --stream DataLoader worker ended from outside at step {error.step} ({error.why}). The "
                f"likely cause is memory: the out-of-memory killer ends the largest processes first. Lower "
                f"--workers (now {self.cfg['workers']}) or --batch-size (the lr follows it). {kept}")

    def kept(self):
        return (f"The last good checkpoint, of step {self.saved_step}, and its encoder are kept in {self.out}."
                if self.saved_step else "No checkpoint had been saved yet, so nothing is kept.")

    def diverged(self):
        """The message for a run whose loss or weights went NaN or Inf."""
        return (f"error: training diverged: the loss, the weights or BatchNorm's running statistics became NaN "
                f"or Inf between steps "
                f"{self.saved_step + 1} and {self.step} (lr {self.lr:.3g}). The likely cause is a learning rate "
                f"too high for this batch size and optimizer: start again with a lower --base-lr"
                f"{' (or --optimizer sgd)' if self.cfg['optimizer'] == 'lars' else ''}. {self.kept()}")


def optimizer_state(saved, optimizer):
    """A saved optimizer state as this code's optim.LARS loads it: the state tensors from the checkpoint, the
    groups' hyper-parameters (weight decay, momentum, eta, clip, eps) from the optimizer just built from the
    checked config, which a resumed run keeps, so a checkpoint's own numbers are never trusted (a string or
    a NaN there would fail or mislead mid-run). Runs saved before --optimizer sgd ran on LARS hold
    torch.optim.SGD's state (its momentum_buffer is LARS's v, and no group adapts); both resume exactly."""
    state = {i: {"v" if k == "momentum_buffer" else k: t for k, t in s.items()} for i, s in saved["state"].items()}
    return own_groups(dict(saved, state=state), optimizer)


def own_groups(saved, optimizer):
    """saved (an optimizer's state_dict) with its groups' hyper-parameters taken from `optimizer`, built from the
    checked config, and its state tensors checked (check_shapes)."""
    check_shapes(saved, optimizer)
    groups = [{**now, "params": group["params"]} for group, now in zip(saved["param_groups"], optimizer.param_groups)]
    return dict(saved, param_groups=groups)


def check_shapes(saved, optimizer):
    """A ValueError unless every tensor of a saved optimizer state is a float tensor of the shape of the
    parameter it belongs to: torch's load_state_dict checks the groups' sizes, not this, and a wrong shape
    would fail in the middle of a step."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, state in saved["state"].items():
        if type(i) is not int or not 0 <= i < len(params) or not all(
                k == "step" or t is None or torch.is_tensor(t) and t.is_floating_point() and t.shape == params[i].shape
                for k, t in state.items()):
            raise ValueError(f"the optimizer's state {i!r} is not of the shape of its parameter")


def cli(main, interrupted="\nStopped before training began; nothing on disk was changed."):
    """Runs a script's main() as a command: a mistake the user can fix (files.UserError), a full or
    read-only disk, or memory running out ends in its message and a non-zero exit, never a traceback; so
    does Ctrl-C before the run takes its own signals (`interrupted` says what that left)."""
    try:
        main()
    except UserError as e:
        raise SystemExit(f"error: {e}")
    except OSError as e:  # a log on a full or read-only disk (checkpoints raise SaveError), a name too long
        if e.errno == errno.ENAMETOOLONG:
            raise SystemExit(f"error: {e.filename or 'a path'}: a name in it is longer than the file system allows; "
                             f"pass a shorter one.")
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
