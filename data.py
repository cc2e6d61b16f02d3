"""Datasets held in memory as one uint8 tensor (N, 3, H, W) plus int64 labels (-1 = no label).

The whole set then moves to the training device once, and augment.py works on it there: no
DataLoader and no per-image Python in the training loop (this is what makes an epoch take seconds).
Sources: CIFAR-10/100 and STL-10 through torchvision (downloaded on first use), or any ImageFolder
directory (`--data path`), decoded once and cached as a tensor in an ignored folder.
"""
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torchvision
import torchvision.transforms.v2.functional as TF
from PIL import Image

from runs import cache_dir, save_atomic

DATASETS = ("cifar10", "cifar100", "stl10")
DEFAULT_ROOT = "data"  # torchvision downloads here
TORCHVISION_FOLDERS = ("cifar-10-batches-py", "cifar-100-python", "stl10_binary")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")

NO_DATA = """\
Could not load {what}: {why}

{dataset} is downloaded by torchvision into {root}/ on first use, which needs a network.
Without one, place the files there by hand, or point --data at an ImageFolder directory,
for example:  python train.py --data path/to/cifar10/train
(an ImageFolder is one sub-folder per class holding that class's images; test.py takes the root
that holds train/ and test/ such folders)."""


class DataError(Exception):
    """A mistake the user can fix (missing folder, corrupt image, no network); printed without a traceback."""


def is_image_folder(path):
    """True when path holds one sub-folder per class, with images in them."""
    if not os.path.isdir(path):
        return False
    for entry in os.scandir(path):
        if entry.is_dir() and any(f.lower().endswith(IMAGE_EXTENSIONS) for f in os.listdir(entry.path)):
            return True
    return False


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

    data: a directory. If it is (or holds train/ and test/) ImageFolders, they are read; otherwise
    torchvision's `dataset` is downloaded into it. subset: a fixed random subset of that many images,
    the same for a given seed. cache: where a decoded ImageFolder is kept (default runs/.cache).
    STL-10's training split is 'unlabeled' + 'train' (labels -1 for the unlabeled part), as used
    for pretraining.
    """
    if os.path.isdir(data) and (is_image_folder(data) or is_image_folder(os.path.join(data, split))):
        return load_folder(folder_split(data, split), image_size, subset, seed, cache or cache_dir(), workers)
    if not os.path.isdir(data) and os.path.normpath(data) != DEFAULT_ROOT:
        raise DataError(f"The --data folder {data!r} does not exist. Point --data at an ImageFolder "
                        f"(one sub-folder per class), or leave it out to download {dataset} into ./{DEFAULT_ROOT}/.")
    if os.path.isdir(data) and any(e.is_dir() and e.name not in TORCHVISION_FOLDERS for e in os.scandir(data)):
        raise DataError(f"No images in the class folders of {data!r} (an ImageFolder needs images in "
                        f"one sub-folder per class).")
    images, labels = load_torchvision(data, dataset, split)
    if images.shape[-1] != image_size:
        images = TF.resize(images, [image_size, image_size], antialias=True)
    if subset is not None:
        keep = subset_indices(len(images), subset, seed)
        images, labels = images[keep], labels[keep]
    return images.contiguous(), labels


def subset_indices(n, size, seed):
    """A fixed random subset of range(n), the same for a given seed."""
    if size > n:
        raise DataError(f"--subset {size} is larger than the dataset ({n} images)")
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size].sort().values


def load_torchvision(root, dataset, split):
    if dataset not in DATASETS:
        raise DataError(f"Unknown --dataset {dataset!r}: choose one of {', '.join(DATASETS)}, "
                        f"or point --data at an ImageFolder directory.")
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


def load_folder(root, image_size, subset, seed, cache, workers):
    """Decodes an ImageFolder into one tensor, resized (shorter side, then centre crop) to
    image_size, and caches it under `cache` so that the next start takes seconds."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    files = [(os.path.join(root, c, f), i) for i, c in enumerate(classes)
             for f in sorted(os.listdir(os.path.join(root, c))) if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
        raise DataError(f"No images found in the ImageFolder {root!r}.")
    if subset is not None:
        files = [files[i] for i in subset_indices(len(files), subset, seed).tolist()]
    key = hashlib.sha1(repr((os.path.abspath(root), image_size, [f for f, _ in files],
                             [os.path.getmtime(f) for f, _ in files])).encode()).hexdigest()[:16]
    path = os.path.join(cache, f"{os.path.basename(os.path.abspath(root))}-{image_size}px-{key}.pt")
    if os.path.exists(path):
        return torch.load(path)

    def decode(file):
        try:
            with Image.open(file) as im:
                img = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
        except Exception as e:
            raise DataError(f"Cannot read image {file!r} ({e}). Remove or replace the file.") from None
        if img.shape[-2:] != (image_size, image_size):
            img = TF.center_crop(TF.resize(img, image_size, antialias=True), image_size)
        return img

    with ThreadPoolExecutor(max(1, workers)) as pool:
        images = torch.stack(list(pool.map(decode, [f for f, _ in files])))
    labels = torch.tensor([c for _, c in files], dtype=torch.int64)
    os.makedirs(cache, exist_ok=True)
    save_atomic((images, labels), path)
    return images, labels
