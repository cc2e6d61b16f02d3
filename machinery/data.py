"""Datasets held in memory as one uint8 tensor (N, 3, H, W) plus int64 labels (-1 = no label).

The whole set then moves to the training device once, and augment.py works on it there: no
DataLoader and no per-image Python in the training loop (this is what makes an epoch take seconds).
Sources: CIFAR-10/100 and STL-10 through torchvision (downloaded on first use into ./data), or any
ImageFolder directory (`--data path`), decoded once and cached as a tensor in an ignored folder.
An ImageFolder is one sub-folder per class, sorted by name as torchvision's; hidden folders and files
(.ipynb_checkpoints/, ._x.jpg) are skipped. A test split is labelled by the class names of its
training split. Any PIL image mode is read; 16-bit and float images are scaled to 0..255 (to_rgb).
The cache holds a digest of each file's bytes, checked at every start, so images replaced under the
same names are decoded again. A link in the folder that leads nowhere is a DataError naming it; so is an
image that is no regular file (a FIFO, a device) or larger than MAX_IMAGE_BYTES. The cache lives in this
user's own folder (files.cache_dir) and is read only when it is this user's file.
"""
import errno
import hashlib
import io
import os
import re
import stat
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
import torch
import torchvision
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from PIL import Image

from machinery.files import (NotRegular, SaveError, UserError, cache_dir, kind_of, open_to_read, save_atomic,
                             special_files)

DATASETS = ("cifar10", "cifar100", "stl10")
DEFAULT_ROOT = "data"  # torchvision downloads here
TORCHVISION_FOLDERS = ("cifar-10-batches-py", "cifar-100-python", "stl10_binary")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
DIGEST_BYTES = 16  # blake2b of each file's bytes, kept in the cache
MAX_IMAGE_BYTES = 256 * 2**20  # no image file is larger: a bound on every read (a link to /dev/zero never ends)
CACHE_FILE = re.compile(r"imagefolder-\d+px-[0-9a-f]{16}\.pt")  # load_folder's cache names
CACHE_TEMPORARY = re.compile(r"\.imagefolder-\d+px-[0-9a-f]{16}\.pt\.[a-z0-9_]{8}\.tmp")  # a killed write's
NOTED = set()  # the ImageFolders whose nested folders have been noted (once per process)
KEEP_CACHES, CACHE_DAYS = 8, 30  # the cache folder keeps the 8 caches used last, none unused for 30 days

NO_DATA = """\
Could not load {what}: {why}

{dataset} is downloaded by torchvision into {root}/ on first use, which needs a network.
Without one, place the files there by hand, or point --data at an ImageFolder directory,
for example:  python train.py --data path/to/cifar10/train
(an ImageFolder is one sub-folder per class holding that class's images; test.py takes the root
that holds train/ and test/ such folders)."""


class DataError(UserError):
    """A mistake the user can fix (missing folder, corrupt image, no network); printed without a traceback."""


def class_names(folder):
    """The class folders of an ImageFolder, sorted by name as torchvision's; hidden ones skipped."""
    return sorted(e.name for e in visible(folder) if is_dir(e))


def class_contents(folder):
    """(The image files of one class folder, sorted, hidden ones skipped; the sub-folders in it, not read)."""
    entries = [(e.name, is_dir(e)) for e in visible(folder)]
    return (sorted(name for name, folder in entries if name.lower().endswith(IMAGE_EXTENSIONS) and not folder),
            sorted(name for name, folder in entries if folder))


def visible(folder):
    """The entries of a folder (os.DirEntry) whose names do not start with a dot; a folder that cannot
    be listed is a DataError naming it."""
    try:
        with os.scandir(folder) as entries:
            return [e for e in entries if not e.name.startswith(".")]
    except OSError as e:
        raise unreadable(folder, e) from None


def is_dir(entry):
    """Whether a folder entry is a folder, following a symbolic link; a link that leads nowhere (to
    nothing, or in a loop: ELOOP) is a DataError naming it, not a folder or image silently left out."""
    try:
        return stat.S_ISDIR(os.stat(entry.path).st_mode) if entry.is_symlink() else entry.is_dir()
    except OSError as e:
        raise unreadable(entry.path, e) from None


def is_image_folder(path):
    """True when path holds one sub-folder per class, with images in them."""
    return os.path.isdir(path) and any(class_contents(os.path.join(path, c))[0] for c in class_names(path))


def holds_images(data, split="train"):
    """True when data is an ImageFolder or holds one as data/<split> (load() reads it, not torchvision's)."""
    return is_image_folder(data) or is_image_folder(os.path.join(data, split))


def folder_split(root, split):
    """The ImageFolder for one split: root/<split>/ when root holds train/ and test/ folders, the
    root itself for the training split, or its sibling ../test for the test split."""
    if is_image_folder(os.path.join(root, split)):
        return os.path.join(root, split)
    if split == "train" and is_image_folder(root):
        return root
    sibling = os.path.join(os.path.dirname(os.path.abspath(root)), split)
    if split == "test" and is_image_folder(root) and is_image_folder(sibling):
        return sibling
    raise DataError(f"No {split} images under {root!r}. Expected an ImageFolder there (one folder "
                    f"per class) or a folder holding train/ and test/ ImageFolders.")


def load(data, dataset="cifar10", split="train", image_size=32, subset=None, seed=0,
         cache=None, workers=4):
    """Returns (images uint8 N x 3 x H x W, labels int64 N) for one split.

    data: a directory. If it is (or holds train/ and test/) ImageFolders, they are read, every split
    labelled by the class names of the training split; otherwise torchvision's `dataset` is
    downloaded into it. subset: a fixed random subset of that many images, the same for a given
    seed. cache: where a decoded ImageFolder is kept (default: this user's, files.cache_dir).
    STL-10's training split is 'unlabeled' + 'train' (labels -1 for the unlabeled part), as used
    for pretraining.
    """
    why = not_a_folder(data)
    if why and (os.path.lexists(data) or os.path.normpath(data) != DEFAULT_ROOT):  # torchvision makes ./data
        raise DataError(f"--data {data!r} {why}. Point --data at an ImageFolder (one sub-folder per class), "
                        f"or leave it out to download {dataset} into ./{DEFAULT_ROOT}/.")
    if holds_images(data, split):
        train = folder_split(data, "train")
        folder = train if split == "train" else folder_split(data, split)
        return load_folder(folder, image_size, subset, seed, cache or cache_dir(), workers, train)
    if not why:
        check_download_root(data, dataset)
    images, labels = load_torchvision(data, dataset, split)
    if images.shape[-1] != image_size:
        images = TF.resize(images, [image_size, image_size], antialias=True)
    if subset is not None:
        keep = subset_indices(len(images), subset, seed)
        images, labels = images[keep], labels[keep]
    return images.contiguous(), labels


def not_a_folder(path):
    """Why path is no folder, as words that follow it in an error message, or None when it is one."""
    if os.path.isdir(path):
        return None
    if os.path.isfile(path):
        return ("is a file, not a folder (to use an archive, unpack it first, e.g. tar -xf FILE, and pass "
                "the folder it makes)")
    if os.path.islink(path):
        return "is a symbolic link that leads to no folder (to nothing, or in a loop back to itself)"
    what = kind_of(path)
    return f"is {what}, not a folder" if what else "does not exist"


def check_download_root(root, dataset):
    """Raises DataError, rather than downloading, for a folder that is no ImageFolder: one whose
    class folders hold no images, or one named by the user (not DEFAULT_ROOT) without torchvision's
    own folders in it."""
    ours = [name in TORCHVISION_FOLDERS for name in class_names(root)]
    if not all(ours):
        raise DataError(f"No images in the class folders of {root!r} (an ImageFolder needs images in "
                        f"one sub-folder per class).")
    if not any(ours) and os.path.normpath(root) != DEFAULT_ROOT:
        raise DataError(f"The --data folder {root!r} holds no ImageFolder: it has no class folders with images "
                        f"in it. Lay it out as {root}/<class>/<image>.jpg, one sub-folder per class (test.py "
                        f"also takes {root}/train/<class>/ and {root}/test/<class>/), or leave --data out to "
                        f"download {dataset} into ./{DEFAULT_ROOT}/.")


def subset_indices(n, size, seed):
    """A fixed random subset of range(n), the same for a given seed."""
    if size <= 0:
        raise DataError(f"--subset must be a positive number of images, not {size}.")
    if size > n:
        raise DataError(f"--subset {size} is larger than the dataset ({n} images)")
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size].sort().values


def load_torchvision(root, dataset, split):
    if dataset not in DATASETS:
        raise DataError(f"Unknown --dataset {dataset!r}: choose one of {', '.join(DATASETS)}, "
                        f"or point --data at an ImageFolder directory.")
    odd = [f for name in TORCHVISION_FOLDERS for f in special_files(os.path.join(root, name))]
    if odd:  # torchvision reads (and hashes) its files on trust: a FIFO would hang it, a device never end
        raise DataError(f"Cannot read {odd[0]!r}: it is {kind_of(odd[0])}, not a file of {dataset}. Remove it; "
                        f"torchvision then downloads the file again.")
    try:
        if dataset == "stl10":
            stl_split = "train+unlabeled" if split == "train" else "test"
            ds = torchvision.datasets.STL10(root, split=stl_split, download=True)
            return torch.from_numpy(ds.data), torch.from_numpy(ds.labels.astype(np.int64))
        cls = torchvision.datasets.CIFAR10 if dataset == "cifar10" else torchvision.datasets.CIFAR100
        ds = cls(root, train=split == "train", download=True)
    except (OSError, RuntimeError) as e:  # URLError is an OSError; a bad archive is a RuntimeError
        raise DataError(NO_DATA.format(what=f"{dataset} ({split})", why=e, dataset=dataset,
                                       root=root)) from None
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2)  # N x 3 x 32 x 32, uint8
    return images, torch.tensor(ds.targets, dtype=torch.int64)


def load_folder(root, image_size, subset, seed, cache, workers, train=None):
    """Decodes an ImageFolder into one tensor, resized (shorter side, then centre crop) to
    image_size, and caches it under `cache` with a digest of each file's bytes: the next start reads
    and hashes the files (no decoding) and takes seconds, and decodes them again if any changed. Labels
    are the indices of the class names of `train`, the training split's ImageFolder (default: root)."""
    files = labelled_files(root, train or root)
    if not files:
        raise DataError(f"No images found in the ImageFolder {root!r}.")
    if subset is not None:
        files = [files[i] for i in subset_indices(len(files), subset, seed).tolist()]
    paths = [f for f, _ in files]
    key = hashlib.sha1(repr((os.path.abspath(root), image_size, class_names(train or root), paths)).encode())
    path = os.path.join(cache, f"imagefolder-{image_size}px-{key.hexdigest()[:16]}.pt")  # no user text in it
    cached = read_cache(path, len(files), image_size)
    if cached is not None:
        changed = (digest_tensor([digest(read_bytes(f)) for f in paths]) != cached[2]).any(1).nonzero().flatten()
        if len(changed) == 0:
            touch(path)                                  # used now: prune_cache keeps the caches used last
            return cached[:2]
        print(f"note: {len(changed)} of the {len(paths)} images in {root} changed since they were cached "
              f"(such as {paths[changed[0]]}); decoding them again", file=sys.stderr)
    pool = ThreadPoolExecutor(max(1, workers))
    try:
        images, digests = zip(*pool.map(partial(decode, image_size=image_size), paths))
    finally:  # Ctrl-C or a bad image: the queued decodes are dropped, not waited for
        pool.shutdown(wait=False, cancel_futures=True)
    images, labels = torch.stack(images), torch.tensor([c for _, c in files], dtype=torch.int64)
    try:
        os.makedirs(cache, mode=0o700, exist_ok=True)  # a new cache folder: this user's alone
        save_atomic((images, labels, digest_tensor(digests)), path, mode=0o600)
    except (SaveError, OSError) as e:  # the cache only saves time: go on without it
        print(f"note: the decoded images are not cached ({e})", file=sys.stderr)
    try:
        prune_cache(cache)
    except OSError:                    # (a file another run removed first, a folder gone): pruned next time
        pass
    return images, labels


def labelled_files(root, train):
    """[(image path, label)] of the ImageFolder root, the label being its class's index among the
    class names of the ImageFolder train. A class that train lacks is a DataError."""
    index = {c: i for i, c in enumerate(class_names(train))}
    unknown = [c for c in class_names(root) if c not in index]
    if unknown:
        raise DataError(f"The classes {', '.join(unknown)} of {root!r} are not in the training split "
                        f"{train!r}, so they have no label there. Remove them from {root!r}, or add them to "
                        f"the training split and train again.")
    contents = {c: class_contents(os.path.join(root, c)) for c in class_names(root)}
    nested = [os.path.join(root, c, sub) for c, (_, subs) in contents.items() for sub in subs]
    if nested and root not in NOTED:
        NOTED.add(root)
        print(f"note: {len(nested)} folder(s) inside the class folders of {root} are not read, nor the images in "
              f"them (such as {nested[0]}): a class is the images directly in its folder. Move them up a level "
              f"to train on them.", file=sys.stderr)
    return [(os.path.join(root, c, f), index[c]) for c, (names, _) in contents.items() for f in names]


def read_cache(path, n, image_size):
    """The decoded (images, labels, digests) cached at path, or None when there is none or it cannot be
    used: not a regular file of this user's that only this user can write (another user's file, a link, a
    FIFO: files.open_to_read, private), cut short, not the n images, labels and digests expected, or a
    pickle that weights_only=True refuses."""
    why = "could not be read"
    try:
        with open_to_read(path, follow=False, private=True) as f:
            cached = torch.load(f, weights_only=True)
        if [(t.dtype, t.shape) for t in cached] == [(torch.uint8, (n, 3, image_size, image_size)),
                                                   (torch.int64, (n,)), (torch.uint8, (n, DIGEST_BYTES))]:
            return cached
    except (FileNotFoundError, NotADirectoryError):  # no cache yet, or removed while we looked
        return None
    except NotRegular as e:
        why = f"is not used, as {e.why}"
    except Exception:
        pass
    print(f"note: the data cache at {path} {why}; decoding the images again to rebuild it", file=sys.stderr)
    return None


def touch(path):
    """Marks a cache file as used now (its modification time), where the file system allows it."""
    try:
        os.utime(path, follow_symlinks=False)
    except OSError:
        pass


def prune_cache(cache, keep=KEEP_CACHES, days=CACHE_DAYS):
    """Bounds the cache folder, at each write: of this project's cache files there (regular files of this
    user, named as load_folder names them), those not among the `keep` used last (their modification
    times: a hit touches its file) or unused for `days` days are removed, and so is a killed write's
    temporary file over a day old. Nothing else in the folder is touched."""
    now, mine = time.time(), []
    for entry in os.scandir(cache):
        st = entry.stat(follow_symlinks=False)
        if stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid():
            if CACHE_FILE.fullmatch(entry.name):
                mine.append((st.st_mtime, entry.path))
            elif CACHE_TEMPORARY.fullmatch(entry.name) and now - st.st_mtime > 86400:
                os.remove(entry.path)
    for i, (used, path) in enumerate(sorted(mine, reverse=True)):
        if i >= keep or now - used > days * 86400:
            os.remove(path)


def decode(file, image_size):
    """(One image file as uint8 3 x image_size x image_size: shorter side resized, then centre crop;
    the digest of the bytes it was decoded from)."""
    blob = read_bytes(file)
    img = rgb(blob, file)
    if img.shape[-2:] != (image_size, image_size):
        img = TF.center_crop(TF.resize(img, image_size, antialias=True), image_size)
    return img, digest(blob)


def read_bytes(file):
    """What an image file holds; one that cannot be read (gone, a link loop, no permission), that is no
    regular file (a FIFO, a device: files.open_to_read) or that holds more than MAX_IMAGE_BYTES is a
    DataError naming it."""
    try:
        with open_to_read(file) as f:
            blob = f.read(MAX_IMAGE_BYTES + 1)
    except NotRegular as e:
        raise DataError(f"Cannot read image {file!r}: {e.why}, not an image file. Remove it, or replace it with "
                        f"the image it stands for.") from None
    except OSError as e:
        raise unreadable(file, e) from None
    if len(blob) > MAX_IMAGE_BYTES:
        raise DataError(f"Cannot read image {file!r}: it holds more than {MAX_IMAGE_BYTES / 2**20:g} MiB, the most "
                        f"an image file may hold here. Remove it, or replace it with a smaller image.")
    return blob


def rgb(blob, file):
    """The bytes of an image file decoded as uint8 3 x H x W; bytes that are no image are a DataError
    naming the file."""
    try:
        with Image.open(io.BytesIO(blob)) as im:
            return torch.from_numpy(to_rgb(im)).permute(2, 0, 1)
    except Exception as e:  # a broken file raises OSError, ValueError, SyntaxError, struct.error, ...
        raise unreadable(file, e) from None


def digest(blob):
    """What a file holds, in DIGEST_BYTES bytes (blake2b)."""
    return hashlib.blake2b(blob, digest_size=DIGEST_BYTES).digest()


def digest_tensor(digests):
    """File digests as one uint8 tensor, N x DIGEST_BYTES."""
    return torch.frombuffer(bytearray(b"".join(digests)), dtype=torch.uint8).view(-1, DIGEST_BYTES)


def to_rgb(im):
    """A PIL image of any mode as an H x W x 3 uint8 array. convert("RGB") would clip 16-bit and float
    images (nearly all white), so they are scaled first: integer modes (I;16, I;16B, and I, as which
    older Pillow opens 16-bit PNGs) from 0..65535, float (F) from 0..1; values outside are clipped."""
    if im.mode == "F" or im.mode.startswith("I"):
        scaled = np.asarray(im, dtype=np.float64) * (255 if im.mode == "F" else 1 / 257)
        im = Image.fromarray(np.clip(np.nan_to_num(scaled), 0, 255).round().astype(np.uint8))
    return np.asarray(im.convert("RGB")).copy()


def unreadable(path, e):
    """The DataError for an image or folder of an ImageFolder that cannot be read: which, why, what to do."""
    if isinstance(e, OSError) and e.errno in (errno.ENOENT, errno.ELOOP) and os.path.islink(path):
        why = ("that leads back to itself (a loop)" if e.errno == errno.ELOOP else
               f"to {os.readlink(path)!r}, which does not exist")
        return DataError(f"Cannot read {path!r}: it is a symbolic link {why}. Remove the link, or point it at "
                         f"the image or class folder it stands for.")
    why = (e.strerror if isinstance(e, OSError) and e.strerror else
           "not an image that Pillow can read" if isinstance(e, Image.UnidentifiedImageError) else e)
    if path.lower().endswith(IMAGE_EXTENSIONS):
        return DataError(f"Cannot read image {path!r} ({why}). Remove or replace the file.")
    return DataError(f"Cannot read the folder {path!r} ({why}). Make it readable, or remove it.")


# ---- the streaming path: for sets larger than memory ----------------------------------------------

def folder_files(data, split="train", subset=None, seed=0):
    """[(image path, label)] of one split of an ImageFolder, labelled as load() labels it, and of the
    same fixed random subset of that many images as load() takes."""
    if not holds_images(data, split):
        raise DataError(f"--stream reads an ImageFolder (one sub-folder per class), and --data {data!r} "
                        f"{not_a_folder(data) or 'holds none'}.")
    train = folder_split(data, "train")
    files = labelled_files(train if split == "train" else folder_split(data, split), train)
    return files if subset is None else [files[i] for i in subset_indices(len(files), subset, seed).tolist()]


class StreamingFolder(torch.utils.data.Dataset):
    """An ImageFolder read from disk every epoch, for sets larger than memory: item i is two random
    resized crops of image i as uint8 3 x S x S, taken in a DataLoader worker. The crop boxes follow
    torchvision's RandomResizedCrop, as augment.sample_crop_boxes does, and the resize is the same
    bicubic as kernels.resized_crop's, without antialiasing (as DeepMind's tf.image.resize too); the
    rest of each view (flip, colour, blur, solarize) is made on the device by augment.Augment, so both
    paths share one definition of the views."""

    def __init__(self, files, image_size, scale=(0.08, 1.0)):
        self.files = files
        self.crop = T.RandomResizedCrop(image_size, scale=scale, interpolation=T.InterpolationMode.BICUBIC,
                                        antialias=False)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        img = rgb(read_bytes(self.files[i][0]), self.files[i][0])
        return self.crop(img), self.crop(img)


def in_memory_bytes(n_images, image_size):
    """What the in-memory path holds: n uint8 images of 3 x S x S."""
    return n_images * 3 * image_size * image_size
