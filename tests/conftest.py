"""Shared fixtures: a tiny ImageFolder with train/ and test/, taken from the real CIFAR-10 JPEGs in
../shared/data/cifar10-jpg when present (a small fixed subset), else generated."""
import os
import shutil

import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR_JPG = os.path.join(ROOT, "..", "shared", "data", "cifar10-jpg")
CLASSES = ("airplane", "automobile", "cat", "ship")


def _generated(path, n, seed):
    """Per-class coloured noise, so that classes are separable, written as JPEG."""
    g = torch.Generator().manual_seed(seed)
    for c, name in enumerate(CLASSES):
        os.makedirs(os.path.join(path, name))
        for i in range(n):
            img = torch.randint(0, 256, (3, 32, 32), generator=g, dtype=torch.uint8) // 2
            img[c % 3] += 100
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(os.path.join(path, name, f"{i:04d}.jpg"))


@pytest.fixture(scope="session")
def image_root(tmp_path_factory):
    """root/{train,test}/<class>/*.jpg: 4 classes, 16 train and 8 test images each."""
    root = tmp_path_factory.mktemp("images")
    for split, n in (("train", 16), ("test", 8)):
        if os.path.isdir(CIFAR_JPG):
            for name in CLASSES:
                src = os.path.join(CIFAR_JPG, split, name)
                os.makedirs(root / split / name)
                for f in sorted(os.listdir(src))[:n]:
                    shutil.copy(os.path.join(src, f), root / split / name / f)
        else:
            _generated(root / split, n, seed=0 if split == "train" else 1)
    return root
