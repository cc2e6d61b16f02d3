"""Linear evaluation and kNN of a BYOL encoder (Grill et al. 2020, arXiv 2006.07733, Sec. 4.1, Appendix C.1).

    python test.py                       # the newest run in runs/, on CIFAR-10
    python test.py runs/<name>           # a run directory, checkpoint.pt or encoder.pt
    python test.py runs/<name> --data path/to/root   # root holds train/ and test/ ImageFolders

The encoder is frozen in eval mode; its features are computed once and a linear classifier is
trained on them (seconds). --augment trains the classifier on random crops and flips instead.
The last line printed is one JSON object, also saved as eval.json in the run directory.
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
from augment import crop_flip, normalize
from models import ARCHS, resnet


def load_encoder(path, arch=None, image_size=None):
    """Loads runs/<name>/encoder.pt (or the online encoder of checkpoint.pt) strictly: every key of
    the expected torchvision ResNet, and nothing else. Returns (encoder, config)."""
    run_dir = path if os.path.isdir(path) else os.path.dirname(path)
    if os.path.isdir(path):
        path = os.path.join(path, "encoder.pt")
    if not os.path.isfile(path):
        raise SystemExit(f"error: no encoder at {path}. Train one with: python train.py")
    cfg = {}
    if os.path.isfile(os.path.join(run_dir, "config.json")):
        with open(os.path.join(run_dir, "config.json")) as f:
            cfg = json.load(f)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise SystemExit(f"error: cannot read {path} ({type(e).__name__}: {e})")
    if isinstance(state, dict) and "online" in state:           # a checkpoint.pt
        cfg = state.get("config", cfg)
        state = {k[len("encoder."):]: v for k, v in state["online"].items() if k.startswith("encoder.")}
    arch = arch or cfg.get("arch", "resnet18")
    image_size = image_size or cfg.get("image_size", 32)
    encoder, _ = resnet(arch, image_size)
    try:
        encoder.load_state_dict(state, strict=True)
    except (RuntimeError, AttributeError) as e:
        raise SystemExit(f"error: {path} does not hold a {arch} encoder for {image_size} px images "
                         f"(choose --arch from {', '.join(ARCHS)} and --image-size to match the run).\n"
                         f"{str(e).splitlines()[0][:300]}")
    return encoder, {**cfg, "arch": arch, "image_size": image_size}, run_dir


@torch.no_grad()
def features(encoder, images, device, batch_size=512):
    """y = f(x) for every image, encoder in eval mode (BN running statistics), no augmentation."""
    encoder.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = normalize(images[i:i + batch_size].to(device))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out.append(encoder(x).float())
    return torch.cat(out)


def knn_accuracy(train_features, train_labels, test_features, test_labels, k=200, t=0.1, chunk=1024):
    """Weighted kNN (Wu et al. 2018, as used in the BYOL/SimSiam literature): cosine similarity to the
    k nearest training features, each votes for its class with weight exp(sim / t). Returns top-1."""
    train_features = F.normalize(train_features, dim=1)
    n_classes = int(train_labels.max()) + 1
    k = min(k, len(train_features))
    correct = 0
    for i in range(0, len(test_features), chunk):
        sim = F.normalize(test_features[i:i + chunk], dim=1) @ train_features.T  # B x N
        sim, idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(sim), n_classes, device=sim.device)
        votes.scatter_add_(1, train_labels[idx], (sim / t).exp())
        correct += (votes.argmax(1) == test_labels[i:i + chunk]).sum().item()
    return correct / len(test_features)


def train_linear(encoder, train_x, train_y, n_classes, device, epochs=100, lr=0.1, batch_size=256,
                 augment=None):
    """Appendix C.1: a linear classifier on the frozen representation, SGD with Nesterov momentum 0.9,
    cross-entropy, no weight decay, cosine lr. train_x is features (default) or uint8 images when
    `augment` (a function of a uint8 batch) makes random crops and flips every epoch. Features are
    standardised with the training mean and std first, which leaves the classifier linear."""
    if augment is None:
        mean, std = train_x.mean(0), train_x.std(0) + 1e-6
        embed = lambda x: (x - mean) / std
    else:
        with torch.no_grad():
            sample = features(encoder, train_x[:2048], device)
        mean, std = sample.mean(0), sample.std(0) + 1e-6
        def embed(x):
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", nargs="?", help="run directory, checkpoint.pt or encoder.pt (default: newest in runs/)")
    p.add_argument("--data", help="ImageFolder root with train/ and test/, or torchvision download folder "
                                  "(default: the run's own)")
    p.add_argument("--dataset", help="cifar10 | cifar100 | stl10 (default: the run's own)")
    p.add_argument("--arch", choices=ARCHS, help="default: the run's own")
    p.add_argument("--image-size", type=int, help="default: the run's own")
    p.add_argument("--subset", type=int, help="use a fixed random subset of this many training images")
    p.add_argument("--test-subset", type=int, help="and of this many test images")
    p.add_argument("--epochs", type=int, default=100, help="linear classifier epochs (default 100)")
    p.add_argument("--lr", type=float, default=0.1, help="linear classifier lr (default 0.1)")
    p.add_argument("--augment", action="store_true", help="train the probe on random crops and flips")
    p.add_argument("--k", type=int, default=200, help="kNN neighbours (default 200)")
    p.add_argument("--random-init", action="store_true",
                   help="evaluate an untrained encoder instead: the baseline every result is read against")
    p.add_argument("--device", help="default: cuda when available")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    if args.random_init:
        cfg = dict(arch=args.arch or "resnet18", image_size=args.image_size or 32)
        encoder, run_dir, args.run = resnet(cfg["arch"], cfg["image_size"])[0], None, "random-init"
    else:
        if args.run is None:
            from train import newest_run
            args.run = newest_run()
        encoder, cfg, run_dir = load_encoder(args.run, args.arch, args.image_size)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    root, dataset = args.data or cfg.get("data", "data"), args.dataset or cfg.get("dataset", "cifar10")
    cache = os.path.join("runs", ".cache") if run_dir is None else os.path.join(os.path.dirname(os.path.abspath(run_dir)), ".cache")
    size = cfg["image_size"]
    train_x, train_y = data.load(root, dataset, "train", size, args.subset, args.seed, cache)
    test_x, test_y = data.load(root, dataset, "test", size, args.test_subset, args.seed, cache)
    labelled = train_y >= 0                                  # STL-10's unlabeled part has label -1
    train_x, train_y = train_x[labelled].to(device), train_y[labelled].to(device)
    test_x, test_y = test_x.to(device), test_y.to(device)
    n_classes = int(train_y.max()) + 1

    encoder = encoder.to(device)
    frozen = {k: v.clone() for k, v in encoder.state_dict().items()}
    encoder.requires_grad_(False)
    print(f"Evaluating {args.run} ({cfg['arch']}, {size} px) on {len(train_x)} train / {len(test_x)} test images")
    f_train, f_test = features(encoder, train_x, device), features(encoder, test_x, device)
    knn = knn_accuracy(f_train, train_y, f_test, test_y, k=args.k)
    classify = train_linear(encoder, train_x if args.augment else f_train, train_y, n_classes, device,
                            args.epochs, args.lr, augment=(lambda x: crop_flip(x, size)) if args.augment else None)
    with torch.no_grad():
        top1, top5 = topk_accuracy(classify(f_test), test_y)
    # Sec. 4.1: the representation is frozen; check that nothing (weights or BN statistics) moved.
    changed = [k for k, v in encoder.state_dict().items() if not torch.equal(v, frozen[k])]
    assert not changed, f"the frozen encoder changed during evaluation: {changed[:5]}"
    result = dict(top1=top1, top5=top5, knn_top1=knn, n_train=len(train_x), n_test=len(test_x),
                  augment=args.augment, run=args.run)
    if run_dir and os.path.isdir(run_dir):
        with open(os.path.join(run_dir, "eval.json"), "w") as f:
            json.dump(result, f, indent=2)
    print(f"linear top-1 {100 * top1:.2f}%  top-5 {100 * top5:.2f}%  kNN top-1 {100 * knn:.2f}%")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    try:
        main()
    except data.DataError as e:
        sys.exit(f"error: {e}")
