"""train.py's command line: every key of its DEFAULTS as a flag, the checks on each value, and the
config of a new or a resumed run (a resumed run keeps the recipe its checkpoint was trained with)."""
import argparse
import math
import os
import time

import torch

from augment import STATS
from models import ARCHS, STEMS
from machinery import data
from machinery.devices import compiler_missing
from machinery.files import RUNS, UserError, quote
from machinery.folders import check_writable, load_checkpoint, new_run_check, resume_check

CHOICES = dict(dataset=data.DATASETS, arch=ARCHS, stem=STEMS, optimizer=("lars", "sgd"),
               tau_schedule=("cosine", "constant"), normalize=tuple(STATS))


def number(kind, low=-math.inf, high=math.inf, above=False, below=False, why=""):
    """An argparse type, shared by every script: a finite `kind` from low (more than low, with above) to
    high (less than high, with below). --lr nan, --k -1 or --epochs 10**12 is a usage error naming the
    flag, before any work: not a traceback, a hang, or a run that trains on nonsense."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, not {text}")
        if (value <= low if above else value < low) or (value >= high if below else value > high):
            show = (lambda x: f"{x:g}") if kind is float else str
            low_part = f"{'more than' if above else 'at least'} {show(low)}" if low > -math.inf else ""
            high_part = f"{'less than' if below else 'at most'} {show(high)}" if high < math.inf else ""
            raise argparse.ArgumentTypeError(f"must be {' and '.join(filter(None, (low_part, high_part)))}, "
                                             f"not {text}{why}")
        return value
    parse.kind = kind
    return parse


# What each number must be. The largest values keep a typo from hanging or exhausting the machine.
TYPES = dict(image_size=number(int, 8, 8192), subset=number(int, 1), test_subset=number(int, 1),
             hidden_dim=number(int, 1, 65536), proj_dim=number(int, 1, 65536), epochs=number(int, 1, 10**6),
             minutes=number(float, 0, 10**6, above=True), base_lr=number(float, 0, above=True),
             batch_size=number(int, 2, 2**20, why=" (BatchNorm needs 2 images per batch; the recipe uses 256)"),
             weight_decay=number(float, 0), momentum=number(float, 0, 1, below=True), eta=number(float, 0, above=True),
             warmup_epochs=number(int, 0, 10**6), tau_base=number(float, 0, 1), log_every=number(int, 1, 10**9),
             knn_every=number(int, 0, 10**6), probe_lr=number(float, 0, above=True), collapse_z_std=number(float, 0),
             workers=number(int, 0, 256), seed=number(int, 0, 2**32 - 1), save_minutes=number(float, 0, 10**6),
             crop_min_scale=number(float, 0, 1, above=True))

# What a resumed run may change: how it runs and reports, not what its saved state means.
RESUMABLE = ("epochs", "data", "device", "compile", "cuda_graph", "log_every", "save_minutes", "knn_every",
             "test_subset", "collapse_z_std", "workers", "stream", "out", "cache_dir")


def check_values(cfg, defaults, where, fix, choices=CHOICES):
    """Every value of cfg (a config.json, or a checkpoint's config) whose key is a flag of `defaults`, checked
    as the command line checks that flag: its type and bounds (TYPES), its list of choices (archs, stems,
    normalisations, ...), true or false for a switch. A config edited by hand or from elsewhere is a UserError
    naming `where` and the key, not a traceback or a run that trains on nonsense."""
    for key, default in defaults.items():
        value = cfg.get(key)
        if key not in cfg or value is None and default is None:
            continue
        check = TYPES.get(key, number(float) if type(default) is float else None)
        if isinstance(default, bool) or key == "blur":
            why = None if isinstance(value, bool) else "not true or false"
        elif check is not None:
            why = None if type(value) is check.kind or check.kind is float and type(value) is int else \
                f"not {'an integer' if check.kind is int else 'a number'}"
            try:
                if why is None:
                    check(repr(value))
            except argparse.ArgumentTypeError as e:
                why = str(e)
        elif key in choices:
            why = None if isinstance(value, str) and value in choices[key] else f"not one of {', '.join(choices[key])}"
        else:
            why = None if isinstance(value, str) and value else "not a name or a path"
        if why:
            raise UserError(f"{where} has {key} {value!r}: {why}. {fix}")


def check_checkpoint(ckpt, path, cfg):
    """A checkpoint's own fields, checked before anything is written: perm is a permutation of the training
    images (as many as --batch-size at least), step a whole number of steps from 0 to the end of the run its
    config describes, seconds a finite number of seconds. (The weights and the optimizer's state are checked
    as they load: runs.Run.restore.)"""
    perm, step, seconds = ckpt["perm"], ckpt["step"], ckpt.get("seconds", 0.0)
    n = len(perm) if torch.is_tensor(perm) and perm.dim() == 1 and perm.dtype == torch.int64 else 0
    wrong = ("perm", "not an order of the training images") if n < cfg["batch_size"] or not torch.equal(
        perm.sort().values, torch.arange(n)) else \
        ("step", f"not a step of the run (0 to {cfg['epochs'] * (n // cfg['batch_size'])})") if type(step) is not int \
        or not 0 <= step <= cfg["epochs"] * (n // cfg["batch_size"]) else \
        ("seconds", "not a time") if type(seconds) not in (int, float) or not 0 <= seconds < math.inf else None
    if wrong:
        raise UserError(f"{path} is damaged: its {wrong[0]} is {wrong[1]}. It cannot be resumed; start a new run, "
                        f"or evaluate the run's encoder.pt.")


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
            kind = TYPES.get(key, number(float) if isinstance(value, float) else type(value) if value else str)
            p.add_argument(flag, type=kind, help=f"default {value}", choices=choices.get(key))
    p.add_argument("--resume", nargs="?", const="latest",
                   help="a run directory or checkpoint to continue (no value: the newest run in runs/)")
    args = vars(p.parse_args(argv))
    resume = args.pop("resume", None)
    return {**defaults, **recipes[args.get("recipe", defaults["recipe"])], **args}, args, resume


def configure(argv, defaults, recipes, doc):
    """The run's config (the defaults, then the flags; a resumed run's own recipe, then the flags given
    now, e.g. --device or --epochs to extend it) and its checkpoint (None for a new run). Checked here,
    before any data is decoded: the run directory can be written, a new run does not land in an old
    one, and a resumed run keeps the recipe its saved state means."""
    cfg, explicit, resume = parse(argv, defaults, recipes, doc)
    if cfg["compile"] and compiler_missing(cfg["device"]):
        raise SystemExit(f"error: {compiler_missing(cfg['device'])}")
    if cfg["stream"] and cfg["minutes"]:
        raise SystemExit("error: --minutes times the in-memory path; with --stream, give --epochs")
    if cfg["cuda_graph"] and (cfg["stream"] or int(os.environ.get("WORLD_SIZE", 1)) > 1):
        raise SystemExit("error: --cuda-graph captures one process's in-memory step: leave out --stream or "
                         "torchrun, or leave out --cuda-graph")
    if not resume:
        source = os.path.basename(os.path.normpath(cfg["data"])) if data.is_image_folder(cfg["data"]) \
            else cfg["dataset"]
        cfg["out"] = cfg["out"] or os.path.join(RUNS, f"{time.strftime('%Y%m%d-%H%M%S')}-{source}-{cfg['arch']}")
        check_writable(cfg["out"])
        new_run_check(cfg["out"])
        return cfg, None
    if "minutes" in explicit:
        raise SystemExit("error: --minutes plans a new run's schedule; a resumed run keeps its own "
                         "(--epochs N extends it)")
    ckpt, path = load_checkpoint(resume)
    if not isinstance(ckpt["config"], dict) or not {"batch_size", "epochs"} <= ckpt["config"].keys():
        raise SystemExit(f"error: the config inside {path} is damaged (it lacks the batch size or the epochs), "
                         f"so the run cannot continue exactly. Start a new run, or evaluate its encoder.pt.")
    saved = {**defaults, "lars_clip": False, **ckpt["config"]}  # (runs saved before --lars-clip: unclipped)
    check_values(saved, defaults, f"the config inside {path}", "The run cannot continue from it: start a new run, or "
                 "evaluate its encoder.pt.", {**CHOICES, "recipe": tuple(recipes)})
    resume_check(os.path.dirname(path))
    changed = [f"--{k.replace('_', '-')} {v} (the run's: {saved.get(k)})" for k, v in explicit.items()
               if k not in RESUMABLE and v != saved.get(k)]
    if changed:
        raise SystemExit(f"error: a resumed run keeps the recipe its checkpoint was trained with, and these "
                         f"flags would change it: {'; '.join(changed)}. Resume without them, or start a new "
                         f"run with them in another --out.")
    check_checkpoint(ckpt, path, saved)
    cfg = {**saved, "device": None, **explicit, "out": os.path.dirname(path)}
    if cfg["compile"] and compiler_missing(cfg["device"]):   # (the run's own --compile)
        raise SystemExit(f"error: {compiler_missing(cfg['device'])}")
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
