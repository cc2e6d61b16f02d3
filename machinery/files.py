"""Where the project's files live and how they are written and read: runs/, the per-user data cache, the
mark that makes a folder a run of ours, atomic writes that never leave a broken file, reads of regular files
only (never a FIFO or a device), loads that cannot run code, and the JSON a run leaves."""
import errno
import json
import os
import pickle
import re
import shlex
import shutil
import stat
import tempfile
import time

import torch

RUNS = "runs"
PROJECT = "byol-reproduction"  # the per-user cache folder's name
UMASK = os.umask(0o022)  # the process's umask, for save_atomic's files (reading it means setting it)
os.umask(UMASK)


class UserError(Exception):
    """A mistake the user can fix (a missing folder, a corrupt image, a full disk): the scripts print
    it as one paragraph, without a traceback (runs.cli)."""


class SaveError(UserError):
    """A file that could not be written (a full disk, a read-only folder)."""


class NotRegular(UserError):
    """A path to read that is no regular file (a FIFO, a device, a socket, a folder), or a cache file that is
    not this user's own; `why` says what it is."""

    def __init__(self, path, why):
        super().__init__(f"{path} is not read: {why}. This project reads regular files only (a FIFO would "
                         f"hang it, a device never end); pass a regular file, or remove it.")
        self.why = why


def cache_dir(choice=None):
    """Where decoded datasets are cached: `choice` (--cache-dir), else $XDG_CACHE_HOME/byol-reproduction, else
    ~/.cache/byol-reproduction. The folder is this user's (data.py makes it with mode 0700), never one beside
    --out, which may be shared: another user cannot plant a cache there, and each cache file is read only
    when it is this user's own (open_to_read, private=True)."""
    if choice:
        return choice
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):                        # (the XDG spec: a relative value is ignored)
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, PROJECT)


def kind(mode):
    """What a file of this st_mode is, in words."""
    for test, name in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a folder"), (stat.S_ISLNK, "a symbolic link"),
                       (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "no regular file"


def kind_of(path, follow=True):
    """What path is, in words ("a regular file", "a FIFO (named pipe)", ...), or None when there is nothing."""
    try:
        return kind((os.stat if follow else os.lstat)(path).st_mode)
    except OSError:
        return None


def special_files(folder):
    """The files under folder (a link followed to what it names) that are no regular files: a FIFO, a device,
    a socket. For a folder that another library reads on trust (torchvision, its CIFAR binaries)."""
    return [os.path.join(where, name) for where, _, names in os.walk(folder) for name in names
            if kind_of(os.path.join(where, name)) not in (None, "a regular file", "a folder")]


def open_to_read(path, follow=True, private=False):
    """path opened to read, as a binary file, when it is a regular file: checked on the open file (fstat), which
    is opened without blocking, so a FIFO cannot hang the reader and nothing can be swapped in between. Anything
    else (a FIFO, a device, a socket, a folder) is a NotRegular naming what it is. follow=False refuses a
    symbolic link; private=True (a cache) also refuses a file of another user or one that others can write."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW))
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.ENXIO) or kind_of(path, follow) is None:
            raise                                     # (ENXIO: a socket; ELOOP: a link, with follow=False)
        raise NotRegular(path, f"it is {kind_of(path, follow=False)}") from None
    st = os.fstat(fd)
    why = (f"it is {kind(st.st_mode)}" if not stat.S_ISREG(st.st_mode) else
           f"it belongs to another user (uid {st.st_uid})" if private and st.st_uid != os.getuid() else
           "others can write it" if private and st.st_mode & 0o022 else None)
    if why:
        os.close(fd)
        raise NotRegular(path, why)
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def quote(path):
    """A path as it must be typed in a shell command (spaces and all)."""
    return shlex.quote(str(path))


def save_atomic(obj, path, write=None, mode=None):
    """write(obj, file) into a fresh temporary file beside path (.NAME.XXXXXXXX.tmp, made with O_EXCL, so
    never an existing file or link), flushed to disk, then renamed over path: a crash or a power cut
    mid-write never leaves a broken file, and a link at path is replaced, never written through. A write
    that fails (a full disk) removes its temporary file, keeps the previous file and raises SaveError
    saying why, read through torch.save's own error to the OSError beneath it. mode: the file's
    permissions (default: as open() would make it)."""
    folder, name = os.path.split(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~UMASK if mode is None else mode)
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


def open_plain(path, flags):
    """path opened with `flags` (and O_NOFOLLOW, O_NONBLOCK, O_CLOEXEC; mode 0o666 if made) when it is a regular
    file with one link: a new file, or one of ours, never a symbolic link, a hard link to a file elsewhere
    (st_nlink > 1), a folder, or a FIFO that would hang the opener. Returns (fd, None), or (None, what the
    path is, in words), the file left as it is."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO):   # a link, a folder, a socket or lone FIFO
            raise
        return None, kind_of(path, follow=False) or "gone"
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
        os.set_blocking(fd, True)
        return fd, None
    os.close(fd)
    return None, kind(st.st_mode) if not stat.S_ISREG(st.st_mode) else f"a file with {st.st_nlink} hard links"


def open_to_append(path):
    """path opened to append text when it is a new file or a regular file of one link (open_plain); anything
    else is a UserError naming what it is."""
    refuse_link(path)
    fd, what = open_plain(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    if fd is None:
        raise UserError(f"{path} is {what}, not the plain file this project appends to, so it is not written "
                        f"(a hard link would change a file elsewhere). Move it away (mv {quote(path)} ...) and "
                        f"run again.")
    return os.fdopen(fd, "a")


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
    cannot run code. A refused, empty or unreadable file, or one that is no regular file, is a clear
    error, not a traceback or a hang."""
    try:
        f = open_to_read(path)
    except NotRegular as e:
        raise SystemExit(f"error: {e}") from None
    with f:
        if os.fstat(f.fileno()).st_size == 0:
            raise SystemExit(f"error: {path} is empty (0 bytes), as a power cut or a crashed disk can leave a file "
                             f"that was being written. It holds nothing to load: use another copy, or train again.")
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            if "global" in str(e).lower():  # torch's WeightsUnpickler: "Unsupported global: GLOBAL ..."
                raise SystemExit(f"error: refused to load {path}: it holds Python objects besides tensors and "
                                 f"plain data, and loading those can run code. This project writes tensors and "
                                 f"plain data only; load only files you trust.") from None
            raise SystemExit(f"error: {path} is not a file torch.save wrote (it may be a text file or a picture, "
                             f"or damaged); pass a run folder, its checkpoint.pt or its encoder.pt.") from None
        except Exception as e:
            raise SystemExit(f"error: {path} cannot be read; it may be truncated or not a file this project "
                             f"wrote ({type(e).__name__}: {first_line(e)})") from None


def first_line(e):
    """The first line of an exception's message (its type where it has none), at most 200 characters."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def read_config(run_dir):
    """The run's config.json as a dict ({} when there is none); a file cut short, not a JSON object or no
    regular file is a UserError naming it."""
    path = os.path.join(run_dir, "config.json")
    if kind_of(path) is None:
        return {}
    with open_to_read(path) as f:
        try:
            cfg = json.loads(f.read(2**24).decode())   # (a config is a few kB: 16 MiB bounds a file that is none)
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
    with open_to_read(path) as f:
        for line in f:
            try:
                record = json.loads(line.decode())
            except ValueError:  # (UnicodeDecodeError and JSONDecodeError are ValueErrors)
                continue
            if isinstance(record, dict):
                records.append(record)
    return records
