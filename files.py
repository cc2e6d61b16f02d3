"""Where the project's files live and how they are written and read: runs/ and its data cache, atomic
writes that never leave a broken file, loads that cannot run code, and the JSON a run leaves."""
import errno
import json
import os
import pickle
import shlex
import shutil

import torch

RUNS = "runs"


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


def save_json(obj, path):
    """A JSON file, written atomically like the checkpoints."""
    save_atomic(obj, path, write=lambda o, f: f.write(json.dumps(o, indent=2).encode()))


def save_lines(records, path):
    """A JSON-lines file (log.jsonl), one record a line, written atomically."""
    save_atomic(records, path, write=lambda rs, f: f.write("".join(json.dumps(r) + "\n" for r in rs).encode()))


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
