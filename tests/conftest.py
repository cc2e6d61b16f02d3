"""Shared fixtures and constants: a tiny ImageFolder with train/ and test/, taken from the real CIFAR-10
JPEGs in ../shared/data/cifar10-jpg when present (a small fixed subset), else generated; a tiny
training run on it; and the small settings every training test uses."""
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR_JPG = os.path.join(ROOT, "..", "shared", "data", "cifar10-jpg")
CLASSES = ("airplane", "automobile", "cat", "ship")
# A training run small enough for a test: batch 8, 32-wide projector and predictor heads, on the CPU,
# a checkpoint after every epoch.
TINY = ["--batch-size", "8", "--hidden-dim", "32", "--proj-dim", "16", "--log-every", "2", "--device", "cpu",
        "--save-minutes", "0"]


def small_byol(**kw):
    """A ResNet-18 BYOL with 32-wide heads, the same weights every call (seed 0)."""
    from models import BYOL
    torch.manual_seed(0)
    return BYOL("resnet18", 32, hidden_dim=32, proj_dim=16, **kw)


def run(*args):
    """A script of the project as a user runs it (its stdout, stderr and exit code)."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def main_of(script, *args):
    """A script's main(args) run as its __main__ runs it (through runs.cli), in this process: its exit code
    and what it printed, as run() gives them, without the seconds a new process takes to import torch.
    An exception that is not an exit is raised here, as the traceback a user would see."""
    import contextlib
    import importlib
    import io
    from machinery.runs import cli
    module, out, err, code = importlib.import_module(script[:-len(".py")]), io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli(lambda: module.main(list(args)))
        except SystemExit as e:
            code = e.code
    if isinstance(code, str):                     # SystemExit("error: ...") prints its message, exits 1
        err.write(code + "\n")
        code = 1
    return subprocess.CompletedProcess(args, code or 0, out.getvalue(), err.getvalue())


def _generated(path, n, seed):
    """Per-class coloured noise, so that classes are separable, written as JPEG."""
    g = torch.Generator().manual_seed(seed)
    for c, name in enumerate(CLASSES):
        os.makedirs(os.path.join(path, name))
        for i in range(n):
            img = torch.randint(0, 256, (3, 32, 32), generator=g, dtype=torch.uint8) // 2
            img[c % 3] += 100
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(os.path.join(path, name, f"{i:04d}.jpg"))


HANG_S = 300  # no test takes a minute here: one that runs 5 has hung (a FIFO opened to read blocks for ever)


@pytest.fixture(autouse=True)
def no_hang():
    """A test that hangs fails after HANG_S seconds, naming itself, instead of stopping the suite. (test_cli's
    fuzz draws set their own, shorter alarm.)"""
    def hung(signum, frame):
        raise TimeoutError(f"this test hung: no end within {HANG_S} s")
    before = signal.signal(signal.SIGALRM, hung)
    signal.alarm(HANG_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, before)


@pytest.fixture(scope="session", autouse=True)
def user_cache(tmp_path_factory):
    """The per-user data cache ($XDG_CACHE_HOME/byol-reproduction) of every test, and of every script a test
    starts (they inherit the environment), in a temporary folder: never the real home's."""
    before = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    from machinery.files import cache_dir
    yield cache_dir()
    if before is None:
        del os.environ["XDG_CACHE_HOME"]
    else:
        os.environ["XDG_CACHE_HOME"] = before


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


@pytest.fixture(scope="session")
def trained(image_root, tmp_path_factory):
    """A finished 2-epoch run (8 steps of 8 images) on the tiny ImageFolder: its run directory."""
    import train
    out = str(tmp_path_factory.mktemp("runs") / "tiny")
    train.main(["--data", str(image_root / "train"), "--subset", "32", "--epochs", "2", "--out", out, *TINY])
    return out
