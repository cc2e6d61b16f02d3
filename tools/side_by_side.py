"""Does it learn? This project's BYOL (train.py) beside an independent BYOL written from the paper,
on the same data, encoder, batch, optimizer, schedules and seed, both evaluated the same way against
the random encoder (issue 8). Not part of the library: nothing imports this file.

    python tools/side_by_side.py --data path/to/cifar10 --epochs 5 --seeds 0 1
    python tools/side_by_side.py --data path/to/cifar10 --arms independent --swap views

Arms: `ours` runs train.py itself (a subprocess, its defaults but for the flags below); `independent`
runs the loop in this file: plain PyTorch, torchvision.transforms.v2 per image, about forty lines
that share no code with train.py, models.py, loss.py or augment.py. `--swap` puts one of the
project's parts into the independent loop (views, model, loss, ema, optimizer), for bisecting a gap.
`random` is the untrained encoder. Every arm is scored by `evaluate` below: weighted kNN (k = 200,
t = 0.1) and a linear probe on fixed subsets (5,000 training images as bank and probe set, 2,000
test images), and each training arm also logs kNN after every epoch (the whole training split as
the bank, as train.py's monitor does). Results: runs/side_by_side/results.jsonl, one line per arm.
"""
import argparse
import copy
import json
import math
import os
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.transforms import v2
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the project's own modules
from machinery import data  # (the project's loader, so that both arms read the very same uint8 tensors)
from machinery.files import cache_dir, load_weights, open_to_append, read_log  # (loads that cannot run code, ...)
from machinery.flags import number  # (a number out of range is a usage error naming its flag)
from machinery.runs import cli  # (a mistake the user can fix ends in its message, not a traceback)

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


# ---- the evaluation, shared by every arm ----------------------------------------------------------

@torch.no_grad()
def embed(encoder, images, batch=1000):
    """Eval-mode (BN running statistics) features of uint8 images, normalised with the CIFAR-10 mean/std."""
    encoder.eval()
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return torch.cat([encoder((images[i:i + batch].float() / 255 - mean) / std) for i in range(0, len(images), batch)])


def knn(bank, bank_y, query, query_y, k=200, t=0.1):
    """Weighted kNN top-1 (Wu et al. 2018): the k most cosine-similar bank images vote exp(sim / t); a bank
    smaller than k (a small --subset) votes whole."""
    sim, idx = (F.normalize(query, dim=1) @ F.normalize(bank, dim=1).T).topk(min(k, len(bank)), dim=1)
    votes = torch.zeros(len(query), int(bank_y.max()) + 1).scatter_add_(1, bank_y[idx], (sim / t).exp())
    return (votes.argmax(1) == query_y).float().mean().item()


def linear(train_f, train_y, test_f, test_y, steps=300):
    """Logistic regression on standardised frozen features, full batch L-BFGS, a little weight decay."""
    mean, std = train_f.mean(0), train_f.std(0) + 1e-6
    x, xt = (train_f - mean) / std, (test_f - mean) / std
    head = nn.Linear(x.shape[1], int(train_y.max()) + 1)
    opt = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(x), train_y) + 5e-4 * head.weight.square().sum()
        loss.backward()
        return loss
    opt.step(closure)
    with torch.no_grad():
        return (head(xt).argmax(1) == test_y).float().mean().item()


def evaluate(encoder, split):
    """kNN and linear top-1 on the fixed subsets (split from eval_split)."""
    bank, query = embed(encoder, split["bank"][0]), embed(encoder, split["query"][0])
    return dict(knn=knn(bank, split["bank"][1], query, split["query"][1]),
                linear=linear(bank, split["bank"][1], query, split["query"][1]))


def eval_split(root, bank=5000, query=2000):
    """Fixed subsets (seed 0 whatever the arm's seed): `bank` training and `query` test images."""
    return dict(bank=data.load(root, split="train", subset=bank, seed=0, cache=CACHE),
                query=data.load(root, split="test", subset=query, seed=0, cache=CACHE))


def encoder_net(stem):
    """torchvision's ResNet-18, fc = Identity; stem "cifar" swaps in the 3x3 stride-1 conv1, no max-pool."""
    net = torchvision.models.resnet18()
    if stem == "cifar":
        net.conv1, net.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    net.fc = nn.Identity()
    return net


# ---- the independent BYOL (arXiv 2006.07733, Sec. 3.1 and 3.3, Algorithm 1) -------------------------

def torchvision_views(solarize_p):
    """Appendix B, Table 6 at 32 px, per image (blur off at 32 px, as train.py's CIFAR default);
    crops resized bicubically, as DeepMind's code (runs before 2026-11-29 21:40 UTC: bilinear)."""
    return v2.Compose([
        v2.RandomResizedCrop(32, scale=(0.08, 1.0), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), v2.RandomGrayscale(0.2),
        v2.RandomSolarize(128, p=solarize_p), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])


def head(i, h=4096, o=256):
    return nn.Sequential(nn.Linear(i, h), nn.BatchNorm1d(h), nn.ReLU(), nn.Linear(h, o))


def independent(args, seed, images, labels, monitor, log):
    """Algorithm 1 in plain PyTorch. Each --swap name takes that part from the project instead."""
    torch.manual_seed(seed)
    if "model" in args.swap:
        from models import BYOL
        byol = BYOL("resnet18", 32, stem=args.stem)
        online, predictor, target = byol.online, byol.predictor, byol.target
        encoder = online.encoder
    else:
        encoder = encoder_net(args.stem)
        online, predictor = nn.Sequential(encoder, head(512)), head(256)
        target = copy.deepcopy(online).requires_grad_(False)
    params = list(online.parameters()) + list(predictor.parameters())
    groups = [dict(params=[p for p in params if p.ndim > 1], weight_decay=args.weight_decay),
              dict(params=[p for p in params if p.ndim == 1], weight_decay=0.0)]  # Sec. 3.3
    opt = torch.optim.SGD(groups, lr=0.0, momentum=0.9)
    if "optimizer" in args.swap:
        from optim import make_optimizer
        opt = make_optimizer(nn.ModuleList([online, predictor]), dict(weight_decay=args.weight_decay, momentum=0.9,
                                                                    optimizer=args.optimizer, eta=0.02, lars_clip=True))
    if "views" in args.swap:
        from augment import Augment
        augment = Augment(32)
    else:
        t1, t2 = torchvision_views(0.0), torchvision_views(0.2)
        augment = lambda x: (torch.stack([t1(i) for i in x]), torch.stack([t2(i) for i in x]))
    if "loss" in args.swap:
        from loss import byol_loss
    else:
        def byol_loss(q1, q2, z1, z2):  # Eq. 2, symmetrised; sg() on the target projections z'_1, z'_2
            return (4 - 2 * F.cosine_similarity(q1, z1.detach()) - 2 * F.cosine_similarity(q2, z2.detach())).mean()
    steps_per_epoch = len(images) // args.batch_size
    K, peak = args.epochs * steps_per_epoch, args.base_lr * args.batch_size / 256
    W = min(10 * steps_per_epoch, K // 10)  # train.py's warm-up rule: 10 epochs, at most a tenth
    online.train(), predictor.train(), target.train()
    t0, k, losses = time.perf_counter(), 0, []
    bar = tqdm(total=K, desc=f"independent-s{seed}", unit="step")
    for epoch in range(args.epochs):
        perm = torch.randperm(len(images))
        for i in range(steps_per_epoch):
            lr = peak * k / W if k < W else peak * (1 + math.cos(math.pi * (k - W) / (K - W))) / 2
            tau = 1 - (1 - args.tau_base) * (math.cos(math.pi * k / K) + 1) / 2
            for g in opt.param_groups:
                g["lr"] = lr
            x1, x2 = augment(images[perm[i * args.batch_size:(i + 1) * args.batch_size]])
            q1, q2 = predictor(online(x1)), predictor(online(x2))
            with torch.no_grad():
                z1, z2 = target(x2), target(x1)  # Algorithm 1: z'_1 of the other view, as loss.byol_loss
            loss = byol_loss(q1, q2, z1, z2)
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                if "ema" in args.swap:
                    byol.update_target(tau)
                else:
                    for xi, theta in zip(target.parameters(), online.parameters()):  # Eq. 1
                        xi.mul_(tau).add_(theta, alpha=1 - tau)
            losses.append(loss.item())
            k += 1
            bar.update()
        log(dict(epoch=epoch + 1, step=k, loss=sum(losses[-steps_per_epoch:]) / steps_per_epoch,
                 knn_top1=monitor(encoder), minutes=(time.perf_counter() - t0) / 60))
        online.train()
    bar.close()
    return encoder


def plot(results, out):
    """kNN monitor against epoch for every training arm (one line per seed), random init dashed; drawn and
    written as the README's pictures are (tools/plots.py: a format matplotlib cannot write is named first)."""
    from tools.plots import picture_path, pyplot, save_figure
    out = picture_path(out)
    fig, (ax_knn, ax_loss) = pyplot().subplots(1, 2, figsize=(11, 4))
    colours = {}
    for r in results:
        kind = r["arm"].rsplit("-s", 1)[0]
        colour = colours.setdefault(kind, f"C{len(colours)}")
        if kind == "random":
            if r["curve"]:
                    ax_knn.axhline(100 * r["curve"][0]["knn_top1"], color=colour, ls="--", lw=1,
                               label=f"random init, seed {r['seed']}")
            continue
        epochs = [0] + [c["epoch"] for c in r["curve"]]
        ax_knn.plot(epochs, [None] + [100 * c["knn_top1"] for c in r["curve"]], color=colour, marker=".",
                    label=f"{kind}, seed {r['seed']}", ls="-" if r["seed"] == 0 else ":")
        ax_loss.plot(epochs[1:], [c["loss"] for c in r["curve"]], color=colour, marker=".",
                     ls="-" if r["seed"] == 0 else ":")
    ax_knn.set(xlabel="epoch", ylabel="kNN top-1 (%), 2,000 test images", title="kNN monitor")
    ax_loss.set(xlabel="epoch", ylabel="BYOL loss, epoch mean", title="loss")
    ax_knn.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, out, dpi=120)


# ---- the arms ------------------------------------------------------------------------------------

def run_ours(args, seed, out):
    """train.py as a user runs it, with --knn-every 1 on the same 2,000 test images."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--data", os.path.join(args.data, "train"),
           "--stem", args.stem, "--batch-size", str(args.batch_size), "--optimizer", args.optimizer,
           "--base-lr", str(args.base_lr), "--weight-decay", str(args.weight_decay), "--tau-base", str(args.tau_base),
           "--epochs", str(args.epochs), "--seed", str(seed), "--knn-every", "1", "--test-subset", "2000",
           "--out", out, "--cache-dir", cache_dir(args.cache_dir),
           *(["--subset", str(args.subset)] if args.subset else []), *args.train_flags]
    ckpt = os.path.join(out, "checkpoint.pt")
    saved = load_weights(ckpt) if os.path.isfile(ckpt) else {}
    done = isinstance(saved, dict) and saved.get("epoch") == args.epochs
    if done:  # a finished run of this arm (e.g. killed before its evaluation): evaluate, don't retrain
        print(f"{out} is complete; evaluating it", flush=True)
    else:
        print(" ".join(cmd), flush=True)
        if subprocess.run(cmd, cwd=ROOT).returncode:
            raise SystemExit(f"error: train.py stopped (its message is above); {out} keeps what it wrote")
    state = load_weights(os.path.join(out, "encoder.pt"))
    encoder = encoder_net(args.stem)
    encoder.load_state_dict(state, strict=True)
    records = read_log(os.path.join(out, "log.jsonl"))
    curve, last_step = [], 0
    for r in records:  # the epoch's mean loss (log lines weighted by their steps), kNN at its end
        if "knn_top1" in r:
            epoch = [q for q in records if last_step < q["step"] <= r["step"]]
            steps = [q["step"] - p for q, p in zip(epoch, [last_step] + [q["step"] for q in epoch[:-1]])]
            curve.append(dict(r, loss=sum(q["loss"] * n for q, n in zip(epoch, steps)) / sum(steps)))
            last_step = r["step"]
    return encoder, curve


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="root holding the train/ and test/ ImageFolders")
    p.add_argument("--arms", nargs="+", default=["random", "ours", "independent"])
    p.add_argument("--swap", nargs="*", default=[], choices=["views", "model", "loss", "ema", "optimizer"])
    p.add_argument("--seeds", nargs="+", type=number(int, 0, 2**32 - 1), default=[0])
    p.add_argument("--stem", default="imagenet", choices=["imagenet", "cifar"])
    p.add_argument("--epochs", type=number(int, 1, 10**6), default=5)
    p.add_argument("--subset", type=number(int, 1), help="train on a fixed subset of this many images (quick checks)")
    p.add_argument("--batch-size", type=number(int, 2, 2**20), default=128)
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "lars"], help="lars: ours only, or --swap optimizer")
    p.add_argument("--base-lr", type=number(float, 0, above=True), default=0.1)
    p.add_argument("--weight-decay", type=number(float, 0), default=1e-5)
    p.add_argument("--tau-base", type=number(float, 0, 1), default=0.99)
    p.add_argument("--train-flags", nargs=argparse.REMAINDER, default=[], help="passed on to train.py (last)")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "side_by_side"))
    p.add_argument("--tag", default="", help="appended to the arm's name (e.g. -lars)")
    p.add_argument("--plot", metavar="PNG", help="draw the curves of --out's results.jsonl into PNG, and stop")
    p.add_argument("--cache-dir", help="where decoded ImageFolders are kept (default: ~/.cache/byol-reproduction)")
    args = p.parse_args(argv)
    if args.plot:
        results = os.path.join(args.out, "results.jsonl")
        if not os.path.isfile(results):
            raise SystemExit(f"error: no {results}: run the arms first (without --plot), or pass their --out")
        print("wrote", plot(read_log(results), args.plot))
        return
    global CACHE
    CACHE = cache_dir(args.cache_dir)
    torch.set_num_threads(torch.get_num_threads())
    split = eval_split(args.data)
    train_x, train_y = data.load(args.data, split="train", subset=args.subset, cache=CACHE)
    test_x, test_y = data.load(args.data, split="test", subset=2000, seed=0, cache=CACHE)
    monitor = lambda enc: knn(embed(enc, train_x), train_y, embed(enc, test_x), test_y)  # as train.py's
    os.makedirs(args.out, exist_ok=True)
    results = os.path.join(args.out, "results.jsonl")
    check_results(results)
    for seed in args.seeds:
        for arm in args.arms:
            swaps = "+" + "+".join(args.swap) if args.swap and arm == "independent" else ""
            name = f"{arm}{swaps}{args.tag if arm != 'random' else ''}-s{seed}"
            curve, t0 = [], time.perf_counter()

            def log(record):
                curve.append(record)
                print(name, json.dumps(record), flush=True)
            if arm == "random":
                torch.manual_seed(seed)
                encoder = encoder_net(args.stem)
                log(dict(epoch=0, knn_top1=monitor(encoder)))  # the monitor's baseline
            elif arm == "ours":
                encoder, curve = run_ours(args, seed, os.path.join(args.out, name))
            else:
                encoder = independent(args, seed, train_x, train_y, monitor, log)
            result = dict(arm=name, **evaluate(encoder, split), minutes=(time.perf_counter() - t0) / 60,
                          curve=[dict(epoch=r["epoch"], knn_top1=r["knn_top1"], loss=r.get("loss")) for r in curve],
                          config={k: v for k, v in vars(args).items() if k not in ("arms", "seeds", "out", "plot", "cache_dir")}, seed=seed)
            print(f"{name}: kNN {100 * result['knn']:.1f}%  linear {100 * result['linear']:.1f}%  "
                  f"({result['minutes']:.1f} min)", flush=True)
            with open_to_append(results) as f:   # (a regular file of one link, never through a link)
                f.write(json.dumps(result) + "\n")


def check_results(path):
    """Before any arm runs: results.jsonl is appended to when it is new, or one this script wrote (empty, or its
    first line an arm's result) and a regular file of one link (files.open_to_append); a user's file of that
    name, a link or a FIFO is left as it is."""
    records = read_log(path) if os.path.lexists(path) else []
    if records[:1] and not (isinstance(records[0], dict) and {"arm", "curve"} <= records[0].keys()) or \
            os.path.isfile(path) and os.path.getsize(path) and not records:
        raise SystemExit(f"error: {path} is not the results.jsonl of tools/side_by_side.py, so nothing is appended to "
                         f"it: pass another --out, or move that file away.")
    open_to_append(path).close()


if __name__ == "__main__":
    cli(main, interrupted="\nStopped; results.jsonl holds the arms that finished.")
