"""Run folders on disk: whose a folder is (a run of ours carries MARK in its config.json), what a new run may
start in, the lock that keeps a second training out, the checkpoint a resumed run loads, the leftovers a
killed run leaves, the newest run, and whether test.py may write eval.json. Nothing here replaces or removes a file that this project did not
write: a folder counts as ours by its mark, never because files with our names are in it."""
import fcntl
import json
import os
import re
import shutil
import socket
import stat
import tempfile

from machinery.files import (RUNS, UserError, kind_of, load_weights, open_plain, open_to_read, quote, read_config,
                             read_log, refuse_link, remove_temporaries, save_lines)

MARK, FORMAT = "byol_run", 1   # config.json's key that only this project writes, and its format version
CHECKPOINT_KEYS = ("online", "target", "predictor", "optimizer", "step", "perm", "rng", "config")
RUN_FILES = ("checkpoint.pt", "encoder.pt", "config.json", "log.jsonl")
OWN_FILES = RUN_FILES + ("lock",)  # what train.py makes in a run folder: in a folder not ours, a clash is refused
EVAL_KEYS = {"top1", "top5", "knn_top1", "n_train", "n_test"}  # what every eval.json test.py writes holds
SCRATCH = re.compile(r"\.time-trial-[a-z0-9_]{8}")  # --minutes' scratch folders (tempfile.mkdtemp's names)


def is_run_folder(folder):
    """Whether folder is a run of this project: its config.json is a regular file of one link (not a link to a
    file elsewhere) holding a JSON object with this project's MARK. Files that only carry our names (a user's
    config.json, log.jsonl or lock) never make a folder ours, so nothing in it is replaced or removed."""
    path = os.path.join(folder, "config.json")
    try:
        st = os.lstat(path)
        cfg = read_config(folder) if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 else {}
    except (OSError, UserError):
        return False
    return type(cfg.get(MARK)) is int and 1 <= cfg[MARK] <= FORMAT


def run_files(out, names=RUN_FILES):
    """The files of a run that `out` already holds (links and folders of those names count too)."""
    return [f for f in names if os.path.lexists(os.path.join(out, f))]


def new_run_check(out, quiet=False, names=OWN_FILES):
    """Whether a new run may start in out (before any work, and again under the lock): not into a run with a
    checkpoint (that one resumes), and not into a folder that is no run of ours (no config.json with the MARK)
    but holds a file of a name we write: a user's config.json, log.jsonl or lock is never replaced. A run of
    ours that stopped before its first checkpoint starts again, with a note."""
    found = run_files(out, names)
    if {"checkpoint.pt", "encoder.pt"} & set(found):
        raise SystemExit(f"error: {out} already holds a run ({', '.join(found)}). "
                         f"Continue it with: python train.py --resume {quote(out)}\n"
                         f"or start the new run in another --out (or delete that folder first).")
    if "lock" in found and held(os.path.join(out, "lock")):
        raise SystemExit(f"error: {out} is in use: a training that is starting or running holds its lock. Wait for "
                         f"it, or train into another --out.")
    if found and not is_run_folder(out):
        raise SystemExit(f"error: {out} holds {', '.join(found)}, which train.py did not write (a run's config.json "
                         f"carries the \"{MARK}\" mark), so nothing there is replaced. Pass another --out, a new or "
                         f"empty folder, or move those files away.")
    if found and not quiet:
        print(f"note: {out} holds a run that stopped before its first checkpoint ({', '.join(found)}); "
              f"this run starts it again and replaces those files")


def resume_check(out):
    """A resumed run writes into its checkpoint's folder: a run of ours (its MARK), one saved before the MARK
    existed (a config.json with train.py's keys), or a folder that holds the checkpoint and none of the other
    names a run writes. Anywhere else a config.json, log.jsonl, lock or encoder.pt is a user's, which the
    resume would replace or trim: refused, and left as it is."""
    try:
        cfg = read_config(out)
    except UserError:
        cfg = None
    if is_run_folder(out) or cfg and {"arch", "batch_size", "epochs", "base_lr"} <= cfg.keys():
        return
    found = run_files(out, ("config.json", "log.jsonl", "lock", "encoder.pt"))
    if found:
        raise SystemExit(f"error: {out} holds {', '.join(found)}, which train.py did not write there (it is no run "
                         f"of ours: no config.json with the \"{MARK}\" mark), so resuming there would replace them. "
                         f"Move the checkpoint into a folder of its own and resume there.")


def check_writable(out):
    """A clear error, before any work, when the run directory cannot be made and written: --out (or the
    nearest of its folders that exists) is a file or a link to nothing, or a folder this user cannot write."""
    parent = os.path.abspath(out)
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        what = "a link to nothing" if os.path.islink(parent) else "a file" if os.path.isfile(parent) else \
            kind_of(parent, follow=False)
        raise SystemExit(f"error: --out {out}: {parent} is {what}, not a folder; pass a folder for the run")
    most = os.pathconf(parent, "PC_NAME_MAX")
    long = [name for name in os.path.relpath(os.path.abspath(out), parent).split(os.sep) if len(os.fsencode(name)) > most]
    if long:
        raise SystemExit(f"error: --out {out}: the name {long[0][:32]}... is {len(os.fsencode(long[0]))} bytes long, "
                         f"and the file system of {parent} allows {most}; pass a shorter --out")
    try:
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as e:
        raise SystemExit(f"error: cannot write the run to {out}: {parent} is not writable ({e.strerror}). "
                         f"Pass --out a folder you can write to.")


def newest_run(runs=RUNS, names=("checkpoint.pt",)):
    """The run directory in `runs` whose newest file of `names` was written last: checkpoint.pt for
    --resume; test.py also takes a run that kept its encoder.pt alone."""
    written = {}
    for d in [os.path.join(runs, d) for d in os.listdir(runs)] if os.path.isdir(runs) else []:
        times = [os.path.getmtime(f) for f in (os.path.join(d, n) for n in names) if os.path.isfile(f)]
        if times:
            written[d] = max(times)
    if not written:
        which = " or ".join(("an " if n[0] in "aeiou" else "a ") + n for n in names)
        raise SystemExit(f"error: no run with {which} in {runs}/; train one with: python train.py")
    return max(written, key=written.get)


def load_checkpoint(resume):
    """(checkpoint dict, its path) from a run directory, a checkpoint.pt, or "latest". Loaded with
    weights_only=True: tensors and plain data only, so a checkpoint from elsewhere cannot run code."""
    path = newest_run() if resume == "latest" else resume
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.pt")
    if kind_of(path) not in (None, "a regular file"):
        raise SystemExit(f"error: {path} is {kind_of(path)}, not a checkpoint; pass a run directory such as runs/<name>")
    if not os.path.isfile(path):
        run_dir = os.path.dirname(path)
        if is_run_folder(run_dir):
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


def lock(run_dir, ours=None):
    """Holds run_dir/lock while this process lives, so that a second training cannot write into the
    same run. The lock is the operating system's (flock), freed when the process ends in any way,
    kill -9 included, so a dead run never holds it. Only a plain file of one link is opened, never a
    link, a hard link to a file elsewhere, a folder or a device; and in a folder that is no run of ours
    (ours: is_run_folder unless the caller knows) the lock must be new (O_EXCL), so a user's file named
    lock is left as it is. Returns the open file: keep it."""
    path = os.path.join(run_dir, "lock")
    ours = is_run_folder(run_dir) if ours is None else ours
    try:
        fd, what = open_plain(path, os.O_RDWR | os.O_CREAT | (0 if ours else os.O_EXCL))
    except FileExistsError:
        if held(path):
            raise SystemExit(f"error: {run_dir} is in use: a training that is starting holds {path}. Wait for it, "
                             f"or train into another --out.") from None
        raise SystemExit(f"error: {path} is not a lock train.py made: {run_dir} is no run of this project (it has "
                         f"no config.json with the \"{MARK}\" mark), so the file is left as it is. Pass another "
                         f"--out, or remove it (rm {quote(path)}) if a run killed as it started left it.") from None
    except PermissionError:
        raise SystemExit(f"error: {path} cannot be opened (permission denied): another user's run, or a file "
                         f"that is not ours. Train into another --out.") from None
    if fd is None:
        raise SystemExit(f"error: {path} is {what}, not the plain file train.py locks, so it is not opened. "
                         f"Remove it (rm -r {quote(path)}) and run again.")
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


def drop_lock(f, run_dir):
    """Removes run_dir/lock when it is still the file f (a lock this process made new) holds: a start that
    fails before the folder is a run of ours leaves nothing of ours there."""
    path = os.path.join(run_dir, "lock")
    try:
        if os.lstat(path).st_ino == os.fstat(f.fileno()).st_ino:
            os.remove(path)
    except OSError:
        pass


def held(path):
    """Whether a process holds the flock on path (a plain file, opened without following a link)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


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
    checkpoint re-runs the steps after it, and logs them again. The log is rewritten as a new file (so
    a hard link to it keeps the old one); a link, a folder or a FIFO there is refused (read_log)."""
    refuse_link(path)
    if os.path.lexists(path):
        save_lines([r for r in read_log(path) if isinstance(r.get("step"), (int, float)) and r["step"] <= step],
                   path)


def check_eval_json(run_dir):
    """eval.json is written into a run folder of ours, or where none is, or over one that test.py wrote (a JSON
    object with its EVAL_KEYS); a user's file of that name elsewhere is left as it is: a message, before any work."""
    path = os.path.join(run_dir, "eval.json")
    if is_run_folder(run_dir) or not os.path.lexists(path):
        return
    try:
        with open_to_read(path) as f:
            ours = EVAL_KEYS <= json.loads(f.read(2**20).decode()).keys()
    except (ValueError, AttributeError, OSError, UserError):   # (not JSON, not an object, not a regular file)
        ours = False
    if not ours:
        raise SystemExit(f"error: {path} is not one test.py wrote, and {run_dir} is no run folder of train.py, so it "
                         f"is left as it is and nothing is evaluated. Move it away, then run again.")
