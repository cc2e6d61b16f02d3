"""Linear evaluation and kNN of a BYOL encoder (Grill et al. 2020, arXiv 2006.07733, Sec. 4 and Appendix C.1),
and semi-supervised fine-tuning (Sec. 4, Table 2; Appendix C.1).

    python test.py                       # the newest run in runs/, on CIFAR-10
    python test.py runs/<name>           # a run directory, checkpoint.pt or encoder.pt
    python test.py runs/<name> --data path/to/root   # root holds train/ and test/ ImageFolders
    python test.py runs/<name> --labels 0.01         # also fine-tune on 1% of the labels (Table 2)
    python test.py runs/<name> --protocol paper      # Appendix C.1's linear protocol (lr picked on held-out images)
    python test.py --plot runs/<name>    # README.assets/curves.png from the run's log.jsonl (plots.py)

The encoder is frozen in eval mode. --protocol fixed-lr (the default): its features are computed once and a
linear classifier is trained on them at one --lr (seconds); --augment trains it on random crops and flips
instead. --protocol paper: Appendix C.1's protocol at CIFAR scale (paper_protocol). The last line printed is
one JSON object, also saved as eval.json in the run directory; its "protocol" names the one used.
"""
from machinery import startup  # noqa: F401  (first: Ctrl-C while torch loads is one line)
import argparse
import copy
import json
import os
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

from augment import STATS, crop_flip
from models import ARCHS, STEMS, resnet
from machinery import data
from machinery.devices import autocast, pick_device
from machinery.evaluation import features, knn_accuracy
from machinery.files import (cache_dir, kind_of, load_weights, quote, read_config, read_log, remove_temporaries,
                             save_json)
from machinery.flags import check_values, number
from machinery.folders import check_eval_json, newest_run
from machinery.runs import cli

# Published CIFAR-10 results of BYOL with a ResNet-18 (the paper reports ImageNet only), for the
# comparison printed after a CIFAR-10 resnet18 evaluation: (value, what and where).
PUBLISHED = {  # our figure that matches it like for like: (value, what and where)
    "probe_test_top1": (0.9258, "online linear classifier's top-1 on the test split (\"Acc@1 (online)\") after "
                                "1000 epochs, solo-learn (github.com/vturrisi/solo-learn, CIFAR results); ours: "
                                "train.py's online probe at its last test-split check (log.jsonl)"),
    "knn_top1": (0.910, "kNN top-1 (k = 200, t = 0.1, the whole training set as the bank) after 800 epochs of "
                        "batch 512, the best epoch's, lightly (docs.lightly.ai, CIFAR-10 benchmarks); ours: "
                        "test.py's kNN, at the end"),
}


MAX_IMAGE_SIZE = 8192          # px, as train.py's --image-size: a typo must not decode absurdly large images
RUN_TEXT_FILES = ("config.json", "log.jsonl", "eval.json", "lock")   # what else a run folder holds
# What test.py builds from a run's config, and what it takes when the config lacks a key (an encoder.pt
# alone): each value is checked as train.py's flag of that name (flags.check_values).
RUN_DEFAULTS = dict(data=data.DEFAULT_ROOT, dataset="cifar10", arch="resnet18", image_size=32, stem=None,
                    normalize="cifar10")


def weights_file(path):
    """The file a run argument names: a weights file itself or, in a run folder, the newer of encoder.pt and
    checkpoint.pt. train.py writes checkpoint.pt first, so a run killed between the two (or one whose
    encoder.pt is lost) has the newest encoder inside its checkpoint; a note says when that one is used."""
    if kind_of(path) not in (None, "a regular file", "a folder"):
        raise SystemExit(f"error: {path} is {kind_of(path)}, not a run: pass a run folder (runs/<name>), its "
                         f"checkpoint.pt or its encoder.pt")
    if os.path.isfile(path):
        if os.path.basename(path) in RUN_TEXT_FILES:
            raise SystemExit(f"error: {path} is a run's {os.path.basename(path)}, not its weights. Pass the run "
                             f"folder: python test.py {quote(os.path.dirname(path) or '.')}")
        return path
    if not os.path.isdir(path):
        raise SystemExit(f"error: {path} does not exist. Pass a run folder (runs/<name>), its checkpoint.pt "
                         f"or its encoder.pt")
    weights = (os.path.join(path, "encoder.pt"), os.path.join(path, "checkpoint.pt"))
    odd = [f for f in weights if kind_of(f) not in (None, "a regular file")]
    if odd:
        raise SystemExit(f"error: {odd[0]} is {kind_of(odd[0])}, not a file of weights; remove it, or pass the run's "
                         f"other weights file")
    found = [f for f in weights if os.path.isfile(f)]
    if not found:
        runs = sorted(e.path for e in os.scandir(path) if e.is_dir() and
                      any(os.path.isfile(os.path.join(e.path, f)) for f in ("encoder.pt", "checkpoint.pt")))
        hint = f"It holds runs: pass one, e.g. python test.py {quote(runs[-1])}" if runs else \
            "Train one with: python train.py"
        raise SystemExit(f"error: no encoder.pt or checkpoint.pt in {path}. {hint}")
    newest = max(found, key=os.path.getmtime)                   # (a tie keeps encoder.pt, listed first)
    if newest.endswith("checkpoint.pt"):
        why = "there is no encoder.pt" if len(found) == 1 else "it was written after encoder.pt"
        print(f"note: evaluating the online encoder inside {newest}: {why}")
    return newest


def load_encoder(path, arch=None, image_size=None, stem=None):
    """Loads runs/<name>/encoder.pt (or the online encoder of checkpoint.pt: weights_file) strictly: every
    key of the expected torchvision ResNet, and nothing else. Returns (encoder, the run's config with the
    arch, image size and stem used, the run directory)."""
    path = weights_file(path)
    run_dir = os.path.dirname(path) or "."          # (python test.py encoder.pt, inside the run folder)
    cfg = read_config(run_dir)
    state = load_weights(path)
    if isinstance(state, dict) and isinstance(state.get("online"), dict):   # a checkpoint.pt
        cfg = state["config"] if isinstance(state.get("config"), dict) else cfg
        state = {k[len("encoder."):]: v for k, v in state["online"].items() if k.startswith("encoder.")}
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SystemExit(f"error: {path} holds a {type(state).__name__}, not an encoder's weights (a dict of "
                         f"tensors, as train.py writes to encoder.pt)")
    bad = [k for k, v in state.items() if v.is_floating_point() and not v.isfinite().all()]
    if bad:
        raise SystemExit(f"error: {path} holds NaN or Inf weights ({', '.join(bad[:3])}...): the run that "
                         f"wrote it diverged. Train again with a lower --base-lr.")
    given = {k: v for k, v in dict(arch=arch, image_size=image_size, stem=stem).items() if v is not None}
    check_values({**cfg, **given}, RUN_DEFAULTS, f"the config of {run_dir}", "Fix its config.json, or pass "
                 "the flag of that name (--arch, --image-size, --stem, --data, --dataset).")
    cfg = {**cfg, **{k: v for k, v in RUN_DEFAULTS.items() if cfg.get(k) is None}, **given}
    encoder, _ = resnet(cfg["arch"], cfg["image_size"], cfg["stem"])
    try:
        encoder.load_state_dict(state, strict=True)
    except (RuntimeError, AttributeError) as e:
        raise SystemExit(f"error: {path} does not hold a {cfg['arch']} encoder for {cfg['image_size']} px images "
                         f"with the {cfg['stem'] or 'default'} stem (choose --arch from {', '.join(ARCHS)}, "
                         f"--image-size and --stem to match the run).\n"
                         f"{str(e).splitlines()[0][:300]}")
    return encoder, cfg, run_dir


def train_linear(encoder, train_x, train_y, n_classes, device, epochs=100, lr=0.1, batch_size=256,
                 augment=None, stats=STATS["cifar10"]):
    """A linear classifier on the frozen representation, SGD with Nesterov momentum 0.9, cross-entropy, no
    weight decay (Appendix C.1), cosine lr (DeepMind's byol eval code). train_x is features (default) or uint8
    images when `augment` (a function of a uint8 batch) makes random crops and flips every epoch. Features
    are standardised with the training mean and std first, which leaves the classifier linear."""
    if augment is None:
        mean, std = train_x.mean(0), train_x.std(0) + 1e-6
        embed = lambda x: (x - mean) / std
    else:
        with torch.no_grad():
            sample = features(encoder, train_x[:2048], device, stats=stats)
        mean, std = sample.mean(0), sample.std(0) + 1e-6
        def embed(x):
            with torch.no_grad(), autocast(device):
                return (encoder(augment(x)).float() - mean) / std
    head = torch.nn.Linear(mean.numel(), n_classes).to(device)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, nesterov=True)
    steps = epochs * max(1, len(train_x) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    encoder.eval()
    for _ in tqdm(range(epochs), desc="linear probe", leave=False):
        perm = torch.randperm(len(train_x), device=device)
        for i in range(max(1, len(train_x) // batch_size)):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            loss = F.cross_entropy(head(embed(train_x[idx])), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return lambda f: head((f - mean) / std)


def topk_accuracy(logits, labels, ks=(1, 5)):
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    return [(top[:, :k] == labels[:, None]).any(1).float().mean().item() for k in ks]


def balanced_subset(labels, fraction, seed):
    """Indices of a class-balanced `fraction` of the labelled images: the same number from every class,
    round(fraction * N / C) and at least 1 (all of a class smaller than that), drawn at random with `seed`,
    so fixed for a given seed. The paper's Table 2 uses SimCLR's fixed ImageNet splits; its Fig. 4, balanced
    ones of its own (Appendix C.1)."""
    labels = labels.cpu()
    classes = labels[labels >= 0].unique().tolist()
    per_class = max(1, round(fraction * int((labels >= 0).sum()) / len(classes)))
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in classes:
        idx = (labels == c).nonzero()[:, 0]
        picks.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    return torch.cat(picks).sort().values


# Appendix C.1 sweeps "5 learning rates {0.4, 0.3, 0.2, 0.1, 0.05} on a local validation set"; at CIFAR scale a
# class-balanced tenth of the training set, as Appendix D.1 (Table 10) holds out 5,000 of CIFAR-10's 50,000.
PAPER_LRS, HELD_OUT = (0.4, 0.3, 0.2, 0.1, 0.05), 0.1


def paper_protocol(encoder, train_x, train_y, n_classes, device, epochs, lrs, seed, augment, stats):
    """Appendix C.1's linear evaluation at CIFAR scale, from training images only: for each lr of `lrs` a linear
    classifier on crops and flips (`augment`) of the training set less a held-out tenth (balanced_subset, fixed
    by `seed`), scored on that tenth; then one at the best lr (the first on a tie) on every training image, as
    Appendix D.2 retrains on training and validation images (C.1 does not say). Returns it and a record: the
    grid, each lr's held-out top-1 (None: diverged), the lr picked, the number held out."""
    held = balanced_subset(train_y, HELD_OUT, seed).to(train_y.device)
    fit = ~torch.isin(torch.arange(len(train_y), device=train_y.device), held)
    f_held, scores = features(encoder, train_x[held], device, stats=stats), []
    for lr in lrs:
        classify = train_linear(encoder, train_x[fit], train_y[fit], n_classes, device, epochs, lr, augment=augment,
                                stats=stats)
        with torch.no_grad():
            logits = classify(f_held)
        scores.append(topk_accuracy(logits, train_y[held])[0] if logits.isfinite().all() else None)
    best = lrs[max(range(len(lrs)), key=lambda i: (scores[i] is not None, scores[i] or 0, -i))]
    classify = train_linear(encoder, train_x, train_y, n_classes, device, epochs, best, augment=augment, stats=stats)
    return classify, dict(lr_grid=list(lrs), held_out_top1=scores, lr=best, n_held_out=len(held))


def finetune(encoder, train_x, train_y, n_classes, device, image_size, epochs=10, lr=0.05, batch_size=64,
             stats=STATS["cifar10"]):
    """Sec. 4, semi-supervised (Table 2): a copy of the encoder and a linear head on top, trained together
    (encoder in train mode) with cross-entropy on the few labelled images. Returns the network.

    The paper (Appendix C.1, "Semi-supervised learning on ImageNet", after SimCLR) fine-tunes on ImageNet's
    fixed 1% / 10% splits with SGD, Nesterov momentum 0.9 and batch 1024 on random crops and flips, the lr
    (from 0.005 to 0.1) and the epochs (30 or 50) picked on a local validation set. We depart from it: batch
    64 (1% of CIFAR-10 is 500 images), a fixed lr 0.05 with cosine decay and no search, fewer epochs by
    default (10, --finetune-epochs), and our own class-balanced subsets (balanced_subset)."""
    if len(train_x) < 2:
        raise SystemExit("error: fine-tuning needs at least 2 labelled images (BatchNorm); raise --labels")
    dim = features(encoder, train_x[:2], device).shape[1]
    net = torch.nn.Sequential(copy.deepcopy(encoder), torch.nn.Linear(dim, n_classes)).to(device)
    net.requires_grad_(True)                       # the original encoder stays frozen and untouched
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, nesterov=True)
    batch_size = min(batch_size, len(train_x))
    steps = len(train_x) // batch_size
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps)
    net.train()
    for _ in tqdm(range(epochs), desc="fine-tune", leave=False):
        perm = torch.randperm(len(train_x), device=device)
        for i in range(steps):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            with autocast(device):
                logits = net(crop_flip(train_x[idx], image_size, mean=stats[0], std=stats[1]))
            loss = F.cross_entropy(logits.float(), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return net.eval()


def check_finite(logits, what, flag, lr):
    """A classifier whose training diverged (an lr too high: its weights, or the logits they give the test
    images, NaN or Inf) is an error naming the flag to lower, not a chance-level figure that replaces the
    previous eval.json."""
    if not logits.isfinite().all():
        raise SystemExit(f"error: the {what} diverged: its weights or its logits became NaN or Inf at {flag} "
                         f"{lr:g}. Run again with a lower {flag}; eval.json is left as it was.")


def compare(result, run_dir):
    """Prints our figures beside the published ones they match (PUBLISHED): CIFAR-10, ResNet-18 with
    the CIFAR stem only. The offline linear probe (top1) has no published twin: solo-learn's 92.58%
    is its online classifier, which train.py's online probe (probe_test_top1) matches."""
    log = read_log(os.path.join(run_dir, "log.jsonl")) if run_dir and os.path.isfile(
        os.path.join(run_dir, "log.jsonl")) else []
    ours = dict(knn_top1=result["knn_top1"])
    online = [r["probe_test_top1"] for r in log if "probe_test_top1" in r]
    if online:
        ours["probe_test_top1"] = online[-1]
    epochs = [r["epoch"] for r in log if "epoch" in r]
    trained = "random init" if run_dir is None else f"{epochs[-1]:g} epochs trained" if epochs else "epochs unknown"
    print(f"Published BYOL on CIFAR-10 with ResNet-18, beside this encoder ({trained}, "
          f"{result['n_train']} train / {result['n_test']} test images):")
    for key, (value, source) in PUBLISHED.items():
        mine = f"{100 * ours[key]:6.2f}%" if key in ours else "   n/a "
        print(f"  {key:>15}  ours {mine}   published {100 * value:6.2f}%   {source}")
    print(f"  {'top1':>15}  ours {100 * result['top1']:6.2f}%   (offline linear probe, --protocol "
          f"{result.get('protocol', 'fixed-lr')}: no published like-for-like figure; docs/evaluation.md)")


def check_classes(train_y, test_y, root, subset):
    """One training class makes every classifier score 100%, so the figures would say nothing about the
    encoder: an error, and eval.json is left as it was. A test split with fewer classes is scored, with
    a warning that its figures cover those classes only."""
    n_train, n_test = len(train_y.unique()), len(test_y.unique())
    if n_train < 2:
        raise SystemExit(f"error: the labelled training images of {root} are {'of one class' if n_train else 'none'}: "
                         f"any encoder scores 100% there, so kNN and linear top-1 would mean nothing. Point --data "
                         f"at an ImageFolder with a folder per class (at least 2)"
                         + (", or raise --subset" if subset else "") + "; eval.json is left as it was.")
    if n_test < n_train:
        print(f"warning: the test images cover {n_test} of the {n_train} training classes: the figures below are "
              f"over those {n_test} only, not comparable with a whole test split", file=sys.stderr)


# The largest values keep a typo (--epochs 1000000000000) from hanging; an lr beyond float32's range
# cannot even step the weights (a classifier that diverges below it is caught after training: check_finite).
COUNT, EPOCHS = number(int, 1), number(int, 1, 10_000)
LR = number(float, 0, torch.finfo(torch.float32).max, above=True)


def lr_grid(text):
    """--lr-grid 0.2,0.1: learning rates, each as --lr takes it."""
    return tuple(LR(value) for value in text.split(","))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", nargs="?", help="run directory, checkpoint.pt or encoder.pt (default: newest in runs/)")
    p.add_argument("--data", help="ImageFolder root with train/ and test/, or torchvision download folder "
                                  "(default: the run's own)")
    p.add_argument("--dataset", help="cifar10 | cifar100 | stl10 (default: the run's own)")
    p.add_argument("--arch", choices=ARCHS, help="default: the run's own")
    p.add_argument("--image-size", type=number(int, 8, MAX_IMAGE_SIZE), help="default: the run's own")
    p.add_argument("--stem", choices=STEMS, help="default: the run's own (cifar at <= 64 px, else imagenet)")
    p.add_argument("--subset", type=COUNT, help="use a fixed random subset of this many training images")
    p.add_argument("--test-subset", type=COUNT, help="and of this many test images")
    p.add_argument("--protocol", choices=("fixed-lr", "paper"), default="fixed-lr",
                   help="fixed-lr (default): one --lr, features computed once (or --augment); paper: Appendix C.1's, "
                        "crops and flips, the lr of --lr-grid best on a held-out tenth (docs/evaluation.md)")
    p.add_argument("--epochs", type=EPOCHS, help="linear classifier epochs (default 100; --protocol paper: 80)")
    p.add_argument("--lr", type=LR, default=0.1, help="linear classifier lr (default 0.1)")
    p.add_argument("--lr-grid", type=lr_grid, default=PAPER_LRS,
                   help="--protocol paper: the lrs tried, comma-separated (default 0.4,0.3,0.2,0.1,0.05, Appendix C.1)")
    p.add_argument("--augment", action="store_true", help="train the probe on random crops and flips")
    p.add_argument("--k", type=COUNT, default=200, help="kNN neighbours (default 200; at most the training images)")
    p.add_argument("--random-init", action="store_true",
                   help="evaluate an untrained encoder instead: the baseline every result is read against")
    p.add_argument("--labels", type=number(float, 0, 1, above=True),
                   help="also fine-tune the encoder on this class-balanced fraction of the training labels "
                        "(0.01 or 0.1: Sec. 4, Table 2)")
    p.add_argument("--finetune-epochs", type=EPOCHS, default=10, help="fine-tuning epochs (default 10)")
    p.add_argument("--finetune-lr", type=LR, default=0.05, help="fine-tuning lr (default 0.05)")
    p.add_argument("--plot", action="store_true",
                   help="draw README.assets/curves.png from the run's log.jsonl, and do nothing else")
    p.add_argument("--device", help="default: cuda when available")
    p.add_argument("--seed", type=number(int, 0, 2**32 - 1), default=0)
    p.add_argument("--cache-dir", help="where decoded ImageFolders are kept (default: ~/.cache/byol-reproduction)")
    args = p.parse_args(argv)

    if args.plot:
        from tools.plots import draw_curves  # the one home of README.assets/ drawing
        print(f"wrote {draw_curves(args.run or newest_run(names=('log.jsonl',)))}")
        return None
    device = pick_device(args.device)                        # before anything slow: --device foo fails at once
    torch.manual_seed(args.seed)
    if args.random_init:
        cfg = dict(arch=args.arch or "resnet18", image_size=args.image_size or 32, stem=args.stem)
        encoder, run_dir, args.run = resnet(cfg["arch"], cfg["image_size"], cfg["stem"])[0], None, "random-init"
    else:
        if args.run is None:
            args.run = newest_run(names=("encoder.pt", "checkpoint.pt"))
        encoder, cfg, run_dir = load_encoder(args.run, args.arch, args.image_size, args.stem)
        check_eval_json(run_dir)                             # before any work: where the figures will go
    root, dataset = args.data or cfg.get("data", data.DEFAULT_ROOT), args.dataset or cfg.get("dataset", "cifar10")
    if args.data is None and not os.path.exists(root) and os.path.normpath(root) != data.DEFAULT_ROOT:
        raise SystemExit(f"error: {args.run} was trained on {root} (its config), which is not here. Pass --data: "
                         f"the folder holding train/ and test/ ImageFolders (or the training one, test/ beside it)")
    cache, size = cache_dir(args.cache_dir), cfg["image_size"]
    train_x, train_y = data.load(root, dataset, "train", size, args.subset, args.seed, cache)
    test_x, test_y = data.load(root, dataset, "test", size, args.test_subset, args.seed, cache)
    labelled = train_y >= 0                                  # STL-10's unlabeled part has label -1
    train_x, train_y = train_x[labelled].to(device), train_y[labelled].to(device)
    test_x, test_y = test_x.to(device), test_y.to(device)
    check_classes(train_y, test_y, root, args.subset)
    n_classes = int(train_y.max()) + 1

    encoder = encoder.to(device)
    frozen = {k: v.clone() for k, v in encoder.state_dict().items()}
    encoder.requires_grad_(False)
    print(f"Evaluating {args.run} ({cfg['arch']}{', ImageNet stem' if cfg.get('stem') == 'imagenet' else ''}, {size} px) on {len(train_x)} train / {len(test_x)} test images")
    stats = STATS[cfg.get("normalize", "cifar10")]                      # the run's own (mean, std)
    f_train, f_test = features(encoder, train_x, device, stats=stats), features(encoder, test_x, device, stats=stats)
    knn = knn_accuracy(f_train, train_y, f_test, test_y, k=args.k)
    crops_and_flips = lambda x: crop_flip(x, size, mean=stats[0], std=stats[1])  # noqa: E731
    paper = args.protocol == "paper"
    epochs = args.epochs or (80 if paper else 100)                     # Appendix C.1: 80 epochs
    if paper:                                      # sees only the training images; the test split scores it
        classify, chosen = paper_protocol(encoder, train_x, train_y, n_classes, device, epochs, args.lr_grid,
                                          args.seed, crops_and_flips, stats)
    else:
        chosen = dict(lr=args.lr)
        classify = train_linear(encoder, train_x if args.augment else f_train, train_y, n_classes, device, epochs,
                                args.lr, stats=stats, augment=crops_and_flips if args.augment else None)
    with torch.no_grad():
        logits = classify(f_test)
    check_finite(logits, "linear classifier", "--lr-grid" if paper else "--lr", chosen["lr"])
    top1, top5 = topk_accuracy(logits, test_y)
    # Appendix C.1: frozen, "without updating the network parameters nor the batch statistics": check it.
    changed = [k for k, v in encoder.state_dict().items() if not torch.equal(v, frozen[k])]
    assert not changed, f"the frozen encoder changed during evaluation: {changed[:5]}"
    result = dict(top1=top1, top5=top5, knn_top1=knn, n_train=len(train_x), n_test=len(test_x),
                  augment=args.augment or paper, run=args.run, protocol=args.protocol, epochs=epochs, **chosen)
    if args.labels is not None:                           # Sec. 4, Table 2: on a copy of the encoder
        keep = balanced_subset(train_y, args.labels, args.seed).to(device)
        net = finetune(encoder, train_x[keep], train_y[keep], n_classes, device, size,
                       args.finetune_epochs, args.finetune_lr, stats=stats)
        logits = features(net, test_x, device, stats=stats)
        check_finite(logits, "fine-tuned network", "--finetune-lr", args.finetune_lr)
        semi_top1, semi_top5 = topk_accuracy(logits, test_y)
        result.update(labels=args.labels, n_labels=len(keep), semi_top1=semi_top1, semi_top5=semi_top5)
        changed = [k for k, v in encoder.state_dict().items() if not torch.equal(v, frozen[k])]
        assert not changed, f"fine-tuning changed the original encoder: {changed[:5]}"
    if paper:
        tried = ", ".join(f"{lr:g}: " + ("diverged" if top1_ is None else f"{100 * top1_:.2f}%")
                          for lr, top1_ in zip(chosen["lr_grid"], chosen["held_out_top1"]))
        print(f"--protocol paper: lr {chosen['lr']:g} picked on {chosen['n_held_out']} held-out training images "
              f"({tried}), then trained on all {len(train_x)}")
    print(f"linear top-1 {100 * top1:.2f}%  top-5 {100 * top5:.2f}%  kNN top-1 {100 * knn:.2f}%")
    if args.labels is not None:
        print(f"fine-tuned on {100 * args.labels:g}% of the labels ({len(keep)} images): "
              f"top-1 {100 * semi_top1:.2f}%  top-5 {100 * semi_top5:.2f}%")
    if dataset == "cifar10" and cfg["arch"] == "resnet18" and cfg.get("stem") != "imagenet" and n_classes == 10 \
            and size == 32:
        compare(result, run_dir)
    print(json.dumps(result))
    if run_dir and os.path.isdir(run_dir):       # last: a folder that cannot take it still shows the figures
        remove_temporaries(run_dir, ["eval.json"], older_than=60)   # a killed test.py's; not one writing now
        save_json(result, os.path.join(run_dir, "eval.json"))
    return result


if __name__ == "__main__":
    cli(main, interrupted="\nStopped; eval.json is left as it was.")
