"""train.py's command line: every key of its DEFAULTS as a flag, the checks on each value, and the
config of a new or a resumed run (a resumed run keeps the recipe its checkpoint was trained with)."""
import argparse
import os
import time

import data
from augment import STATS
from files import RUNS, quote
from models import ARCHS, STEMS
from runs import check_writable, load_checkpoint, run_files

CHOICES = dict(dataset=data.DATASETS, arch=ARCHS, stem=STEMS, optimizer=("lars", "sgd"),
               tau_schedule=("cosine", "constant"), normalize=tuple(STATS))
# What each number must be: (the smallest value allowed, whether that value itself is allowed).
BOUNDS = dict(image_size=(8, True), subset=(1, True), test_subset=(1, True), hidden_dim=(1, True),
              proj_dim=(1, True), epochs=(1, True), minutes=(0, False), batch_size=(2, True), base_lr=(0, False),
              weight_decay=(0, True), momentum=(0, True), eta=(0, False), warmup_epochs=(0, True),
              tau_base=(0, True), log_every=(1, True), knn_every=(0, True), probe_lr=(0, False),
              collapse_z_std=(0, True), workers=(0, True))
# What a resumed run may change: how it runs and reports, not what its saved state means.
RESUMABLE = ("epochs", "data", "device", "compile", "log_every", "knn_every", "test_subset", "collapse_z_std",
             "workers", "stream", "out")


def parse(argv, defaults, recipes, doc):
    """Command-line flags override `defaults` (or the --recipe of `recipes` that replaces them). Returns
    (config, the flags given explicitly, --resume)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=argparse.SUPPRESS)
    choices = {**CHOICES, "recipe": tuple(recipes)}
    for key, value in defaults.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool) or key == "blur":
            p.add_argument(flag, action=argparse.BooleanOptionalAction,
                           help="default: off at 32 px, on above" if key == "blur" else f"default {value}")
        else:
            kind = int if key in ("subset", "test_subset") else float if key == "minutes" else \
                {int: int, float: float}.get(type(value), str)
            p.add_argument(flag, type=kind, help=f"default {value}", choices=choices.get(key))
    p.add_argument("--resume", nargs="?", const="latest",
                   help="a run directory or checkpoint to continue (no value: the newest run in runs/)")
    args = vars(p.parse_args(argv))
    resume = args.pop("resume", None)
    for key, value in args.items():
        low, inclusive = BOUNDS.get(key, (None, True))
        if low is not None and value is not None and (value < low or (value == low and not inclusive)):
            p.error(f"--{key.replace('_', '-')} {value}: must be {'at least' if inclusive else 'more than'} {low}"
                    + (" (BatchNorm needs 2 images per batch; the recipe uses 256)" if key == "batch_size" else ""))
    if args.get("tau_base", 0) > 1 or args.get("momentum", 0) >= 1:
        p.error("--tau-base must lie in [0, 1] and --momentum in [0, 1)")
    return {**defaults, **recipes[args.get("recipe", defaults["recipe"])], **args}, args, resume


def configure(argv, defaults, recipes, doc):
    """The run's config (the defaults, then the flags; a resumed run's own recipe, then the flags given
    now, e.g. --device or --epochs to extend it) and its checkpoint (None for a new run). Checked here,
    before any data is decoded: the run directory can be written, a new run does not land in an old
    one, and a resumed run keeps the recipe its saved state means."""
    cfg, explicit, resume = parse(argv, defaults, recipes, doc)
    if cfg["stream"] and cfg["minutes"]:
        raise SystemExit("error: --minutes times the in-memory path; with --stream, give --epochs")
    if not resume:
        source = os.path.basename(os.path.normpath(cfg["data"])) if data.is_image_folder(cfg["data"]) \
            else cfg["dataset"]
        cfg["out"] = cfg["out"] or os.path.join(RUNS, f"{time.strftime('%Y%m%d-%H%M%S')}-{source}-{cfg['arch']}")
        check_writable(cfg["out"])
        if run_files(cfg["out"]):
            raise SystemExit(f"error: {cfg['out']} already holds a run ({', '.join(run_files(cfg['out']))}). "
                             f"Continue it with: python train.py --resume {quote(cfg['out'])}\n"
                             f"or start the new run in another --out (or delete that folder first).")
        return cfg, None
    if "minutes" in explicit:
        raise SystemExit("error: --minutes plans a new run's schedule; a resumed run keeps its own "
                         "(--epochs N extends it)")
    ckpt, path = load_checkpoint(resume)
    saved = {**defaults, "lars_clip": False, **ckpt["config"]}  # (runs saved before --lars-clip: unclipped)
    changed = [f"--{k.replace('_', '-')} {v} (the run's: {saved.get(k)})" for k, v in explicit.items()
               if k not in RESUMABLE and v != saved.get(k)]
    if changed:
        raise SystemExit(f"error: a resumed run keeps the recipe its checkpoint was trained with, and these "
                         f"flags would change it: {'; '.join(changed)}. Resume without them, or start a new "
                         f"run with them in another --out.")
    cfg = {**saved, "device": None, **explicit, "out": os.path.dirname(path)}
    steps_per_epoch = len(ckpt["perm"]) // cfg["batch_size"]
    done = f"{cfg['out']} is at step {ckpt['step']} ({ckpt['step'] / steps_per_epoch:g} epochs)"
    if ckpt["step"] >= cfg["epochs"] * steps_per_epoch:
        if "epochs" in explicit:
            raise SystemExit(f"error: --epochs {cfg['epochs']} ends where the run already is: {done}. "
                             f"Pass more epochs to train it further.")
        print(f"Nothing to do: {done}, the end of its {cfg['epochs']} epochs. Extend it with --epochs N "
              f"(N > {cfg['epochs']}), or evaluate it with: python test.py {quote(cfg['out'])}")
        raise SystemExit(0)
    return cfg, ckpt
