"""Where the project's files live and how they are written and read: runs/ and its data cache, atomic
writes that never leave a broken file, loads that cannot run code, and the JSON a run leaves."""
import errno
import json
import os
import pickle
import re
import shlex
import shutil
import tempfile
import time

import torch

RUNS = "runs"
UMASK = os.umask(0o022)  # the process's umask, for save_atomic's files (reading it means setting it)
os.umask(UMASK)


class UserError(Exception):
    """A mistake the user can fix (a missing folder, a corrupt image, a full disk): the scripts print
    it as one paragraph, without a traceback (runs.cli)."""


class SaveError(UserError):
    """A file that could not be written (a full disk, a read-only folder)."""


def cache_dir(run_dir=None):
    """Decoded datasets are cached in .cache beside the run directories (runs/.cache by default)."""
    parent = os.path.dirname(os.path.abspath(run_dir)) if run_dir else RUNS
    return os.path.join(parent, ".cache")


def quote(path):
    """A path as it must be typed in a shell command (spaces and all)."""
    return shlex.quote(str(path))


def save_atomic(obj, path, write=None):
    """write(obj, file) into a fresh temporary file beside path (.NAME.XXXXXXXX.tmp, made with O_EXCL, so
    never an existing file or link), flushed to disk, then renamed over path: a crash or a power cut
    mid-write never leaves a broken file, and a link at path is replaced, never written through. A write
    that fails (a full disk) removes its temporary file, keeps the previous file and raises SaveError
    saying why, read through torch.save's own error to the OSError beneath it."""
    folder, name = os.path.split(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~UMASK)                                  # as open() would make it
        with os.fdopen(fd, "wb") as f:
            (write or torch.save)(obj, f)
            f.flush()
            os.fsync(f.fileno())                                       # on disk before it takes the name
        os.replace(tmp, path)
        sync_folder(folder)
    except BaseException as e:
        cause = os_error(e)
        full = cause is not None and cause.errno in (errno.ENOSPC, errno.EDQUOT)
        free = shutil.disk_usage(folder).free if full else None  # read before the partial file goes
        if tmp and os.path.lexists(tmp):
            os.remove(tmp)
        if cause is None:
            raise
        why = (f"the disk holding {folder} is full ({free / 2**20:.0f} MiB free with the partial file)" if full
               else cause.strerror or str(cause))
        raise SaveError(f"Could not write {path}: {why}. The partial file is removed and the previous "
                        f"{name}, if there was one, is kept.") from None


def temporaries(name):
    """The pattern of save_atomic's temporary names for a file called `name`: .NAME.XXXXXXXX.tmp."""
    return re.compile(rf"\.{re.escape(name)}\.[a-z0-9_]{{8}}\.tmp")


def remove_temporaries(folder, names, older_than=0):
    """Removes what save_atomic left for these file names in folder when its process was killed mid-write,
    and nothing else: plain files only, never links, and only those older than `older_than` seconds (a
    process writing one right now keeps it). Returns how many went."""
    patterns, removed = [temporaries(name) for name in names], 0
    for entry in os.scandir(folder):
        if any(p.fullmatch(entry.name) for p in patterns) and entry.is_file(follow_symlinks=False) \
                and time.time() - entry.stat(follow_symlinks=False).st_mtime >= older_than:
            os.remove(entry.path)
            removed += 1
    return removed


def sync_folder(folder):
    """The folder's entries on disk (a rename survives a power cut), where the system allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def os_error(e):
    """The OSError behind an exception (torch.save raises a RuntimeError over a failed write), or None."""
    while e is not None and not isinstance(e, OSError):
        e = e.__cause__ or e.__context__
    return e


def open_to_append(path):
    """path opened to append text, refusing a link there (O_NOFOLLOW): a file in a run folder is never
    written through a link, which could point anywhere."""
    refuse_link(path)
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666), "a")


def refuse_link(path):
    """A UserError when path is a symbolic link (dangling or not): this project does not write through one."""
    if os.path.islink(path):
        raise UserError(f"{path} is a symbolic link, and this project never writes through one (it could point "
                        f"outside the run folder). Remove the link (rm {quote(path)}) and run again.")


def save_json(obj, path):
    """A JSON file, written atomically like the checkpoints."""
    save_atomic(obj, path, write=lambda o, f: f.write(json.dumps(o, indent=2).encode()))


def save_lines(records, path):
    """A JSON-lines file (log.jsonl), one record a line, written atomically."""
    save_atomic(records, path, write=lambda rs, f: f.write("".join(json.dumps(r) + "\n" for r in rs).encode()))


def load_weights(path):
    """torch.load with weights_only=True: tensors and plain data only, so that a file from elsewhere
    cannot run code. A refused, empty or unreadable file is a clear error, not a traceback."""
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise SystemExit(f"error: {path} is empty (0 bytes), as a power cut or a crashed disk can leave a file "
                         f"that was being written. It holds nothing to load: use another copy, or train again.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "global" in str(e).lower():  # torch's WeightsUnpickler: "Unsupported global: GLOBAL ..."
            raise SystemExit(f"error: refused to load {path}: it holds Python objects besides tensors and plain "
                             f"data, and loading those can run code. This project writes tensors and plain data "
                             f"only; load only files you trust.") from None
        raise SystemExit(f"error: {path} is not a file torch.save wrote (it may be a text file or a picture, or "
                         f"damaged); pass a run folder, its checkpoint.pt or its encoder.pt.") from None
    except Exception as e:
        raise SystemExit(f"error: {path} cannot be read; it may be truncated or not a file this project "
                         f"wrote ({type(e).__name__}: {first_line(e)})") from None


def first_line(e):
    """The first line of an exception's message (its type where it has none), at most 200 characters."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def read_config(run_dir):
    """The run's config.json as a dict ({} when there is none); a file cut short or not a JSON object is a
    UserError naming it."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        return {}
    with open(path, "rb") as f:
        try:
            cfg = json.loads(f.read().decode())
        except ValueError:  # (UnicodeDecodeError and JSONDecodeError are ValueErrors)
            cfg = None
    if not isinstance(cfg, dict):
        raise UserError(f"{path} is not a config that train.py wrote: it is cut short or not a JSON object. "
                        f"Delete it and tell test.py what the encoder is (--arch, --image-size, --stem, --data).")
    return cfg


def read_log(path):
    """The records of a log.jsonl: each line that is a JSON object, skipping a line cut short by a crash
    and any line that is no record (a stray byte, a list)."""
    records = []
    with open(path, "rb") as f:
        for line in f:
            try:
                record = json.loads(line.decode())
            except ValueError:  # (UnicodeDecodeError and JSONDecodeError are ValueErrors)
                continue
            if isinstance(record, dict):
                records.append(record)
    return records
