"""The README's pictures, drawn in one place (needs matplotlib):

    python tools/plots.py views [--data DIR]                 # README.assets/views.png: 8 images, their two views
    python tools/plots.py curves runs/<name> [--random-knn X]  # README.assets/curves.png from the run's log.jsonl
    python tools/plots.py curves results/h200-minutes5 --out README.assets/curves-h200.png
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's own modules
from machinery import startup  # noqa: F401  (before torch: Ctrl-C while torch loads is one line)
import argparse
import math

import torch

from augment import CIFAR10_MEAN, CIFAR10_STD, Augment, to_float
from machinery import data
from machinery.files import cache_dir, read_config, read_log, save_atomic
from machinery.flags import number
from machinery.folders import newest_run
from machinery.runs import cli

ASSETS = "README.assets"


def pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: the pictures need matplotlib: pip install matplotlib")
    return plt


def picture_path(out):
    """The file a picture for --out goes to, checked before any drawing: a name without an extension gets
    .png, as matplotlib itself would do (whoever types --out curves wants the picture; the caller reports
    the real name); an extension matplotlib cannot write is an error naming those it can."""
    from matplotlib.backend_bases import FigureCanvasBase
    formats = sorted(set(FigureCanvasBase.get_supported_filetypes()) - {"pgf"})   # (pgf needs LaTeX)
    if out.endswith(os.sep) or os.path.isdir(out):
        raise SystemExit(f"error: --out {out} is a folder; name the picture, e.g. {os.path.join(out, 'curves.png')}")
    ext = os.path.splitext(out)[1][1:].lower()
    if ext and ext not in formats:
        raise SystemExit(f"error: --out {out}: cannot draw a .{ext} picture. End the name with one of "
                         f".{', .'.join(formats)} (.png is the README's)")
    return out if ext else out + ".png"


def save_figure(fig, path, **kw):
    """fig written to path (from picture_path) atomically, as the checkpoints are (files.save_atomic: a
    failed write keeps the previous picture and says why); returns path."""
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        save_atomic(fig, path, write=lambda f, file: f.savefig(file, format=os.path.splitext(path)[1][1:], **kw))
    except OSError as e:
        raise SystemExit(f"error: cannot write {path}: {e.strerror} ({e.filename}). Pass --out a file in a folder "
                         f"you can write to.")
    finally:
        pyplot().close(fig)
    return path


def finite(x):
    """x is a real number that an axis can hold: not a string, None, a bool, NaN or Inf, as a hand-edited log
    may hold, nor beyond +-1e300 (matplotlib cannot scale an axis that spans +-1e308)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and abs(x) <= 1e300


def draw_views(root=data.DEFAULT_ROOT, out=os.path.join(ASSETS, "views.png"), cache=None):
    """Three rows: 8 training images (a fixed subset), their view 1 and their view 2 (seed 0)."""
    plt, out = pyplot(), picture_path(out)
    try:
        images, _ = data.load(root, "cifar10", "train", 32, subset=8, seed=0, cache=cache_dir(cache))
    except data.DataError as e:
        raise SystemExit(f"error: {e}")
    torch.manual_seed(0)
    v1, v2 = Augment(32)(images)
    mean, std = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    rows = [to_float(images), v1 * std + mean, v2 * std + mean]
    fig, axes = plt.subplots(3, len(images), figsize=(len(images), 3.3))
    for r, (name, row) in enumerate(zip(["image", "view1", "view2"], rows)):
        axes[r, 0].set_ylabel(name)
        for c, img in enumerate(row):
            axes[r, c].imshow(img.permute(1, 2, 0).clamp(0, 1).numpy())
            axes[r, c].set_xticks([]), axes[r, c].set_yticks([])
    return save_figure(fig, out, dpi=150, bbox_inches="tight")


CURVES = (("loss", "BYOL loss"), ("knn_top1", "kNN top-1 (test split)"),
          ("probe_top1", "online probe top-1 (train batches)"), ("z_std", "z_std: collapse monitor"),
          ("lr", "learning rate"), ("tau", "tau: target EMA rate"))


def draw_curves(run, out=os.path.join(ASSETS, "curves.png"), random_knn=None):
    """Draws loss, kNN accuracy, online-probe accuracy, z_std, lr and tau against epoch from one run's
    log.jsonl; a key missing from some lines (kNN and probe are logged less often) is drawn where
    present, and only where it is a finite number. random_knn: the random encoder's kNN top-1 measured the
    same way, drawn as a dashed line."""
    plt, out = pyplot(), picture_path(out)
    path = os.path.join(run, "log.jsonl") if os.path.isdir(run) else run
    if not os.path.isfile(path):
        raise SystemExit(f"error: no log at {path}; pass a run directory such as runs/<name>")
    records = [r for r in read_log(path) if finite(r.get("epoch"))]
    if not records:
        raise SystemExit(f"error: {path} holds no log line with an epoch, so there is no curve to draw")
    cfg = read_config(os.path.dirname(path))
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, (key, title) in zip(axes.flat, CURVES):
        points = [(r["epoch"], r[key]) for r in records if finite(r.get(key))]
        ax.set_title(title)
        ax.set_xlabel("epoch")
        if points:
            ax.plot(*zip(*points), marker="." if len(points) < 50 else None)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
        tested = [(r["epoch"], r["probe_test_top1"]) for r in records if finite(r.get("probe_test_top1"))]
        if key == "probe_top1" and tested:  # the same probe on the test split, with each kNN check
            ax.plot(*zip(*tested), marker=".", ls="--", label="test split")
            ax.legend(fontsize=8)
        if key == "knn_top1" and random_knn is not None:
            ax.axhline(random_knn, color="grey", ls="--", label="random encoder")
            ax.legend(fontsize=8)
        if key == "z_std":
            d, low = cfg.get("proj_dim"), cfg.get("collapse_z_std")
            ax.axhline(1 / math.sqrt(d if finite(d) and d > 0 else 256), color="green", ls="--",
                       label="1/sqrt(d): healthy")
            ax.axhline(low if finite(low) else 0.01, color="red", ls=":", label="collapse warning")
            ax.legend(fontsize=8)
    fig.suptitle(os.path.basename(os.path.dirname(os.path.abspath(path))))
    fig.tight_layout()
    return save_figure(fig, out, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("picture", choices=["views", "curves"])
    p.add_argument("run", nargs="?", help="curves: a run directory or its log.jsonl (default: newest in runs/)")
    p.add_argument("--data", default=data.DEFAULT_ROOT, help="views: CIFAR-10 download folder or an ImageFolder")
    p.add_argument("--random-knn", type=number(float, 0, 1, why=" (a top-1 accuracy: 0.35, not 35)"), help="curves: the random encoder's kNN top-1, as a dashed line")
    p.add_argument("--out", help="the PNG to write (default: README.assets/<picture>.png)")
    p.add_argument("--cache-dir", help="views: where decoded ImageFolders are kept (default: ~/.cache/byol-reproduction)")
    args = p.parse_args(argv)
    if args.picture == "views":
        print(f"wrote {draw_views(args.data, args.out or os.path.join(ASSETS, 'views.png'), args.cache_dir)}")
    else:
        out = args.out or os.path.join(ASSETS, "curves.png")
        print(f"wrote {draw_curves(args.run or newest_run(names=('log.jsonl',)), out, random_knn=args.random_knn)}")


if __name__ == "__main__":
    cli(main, interrupted="\nStopped; no picture was written.")
