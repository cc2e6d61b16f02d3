"""BYOL pretraining (Grill et al. 2020, arXiv 2006.07733), single file, top to bottom.

    python train.py                                   # CIFAR-10, ResNet-18, the recipe below
    python train.py --data path/to/train --epochs 3   # any ImageFolder
    python train.py --resume runs/<name>              # continue exactly where it stopped
"""
import argparse
import json
import math
import os
import signal
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
from augment import Augment
from models import ARCHS, BYOL, STEMS
from test import features, knn_accuracy

# ----------------------------------------------------------------------------------------------
# The recipe. "paper" = Grill et al. 2020 (ImageNet, Sec. 3.3 and Appendix C); the paper has no
# CIFAR setting, so CIFAR-10 values come from solo-learn's byol.yaml for CIFAR ResNet-18, the
# strongest public recipe (92.58% linear top-1 after 1000 epochs).
DEFAULTS = dict(
    dataset="cifar10",     # cifar10 | cifar100 | stl10; or --data pointing at an ImageFolder
    data="data",           # where torchvision downloads to, or an ImageFolder directory
    image_size=32,         # px; 32 for CIFAR, 96 for STL-10
    subset=None,           # train on a fixed random subset of this many images
    arch="resnet18",       # resnet18 | resnet50 (paper: ResNet-50)
    stem=None,             # None: CIFAR stem at <= 64 px, else ImageNet's; imagenet at 32 px = 8x cheaper CPU proxy
    hidden_dim=4096,       # projector and predictor hidden width (paper Sec. 3.3)
    proj_dim=256,          # projection size (paper Sec. 3.3)
    predictor=True,        # --no-predictor: the Table 5 ablation, which collapses
    epochs=1000,           # solo-learn (paper: 1000 on ImageNet)
    batch_size=256,        # solo-learn (paper: 4096 on 512 TPU cores)
    optimizer="lars",      # lars (paper) | sgd
    base_lr=1.0,           # lr = base_lr * batch_size / 256; solo-learn (paper: 0.2)
    weight_decay=1e-5,     # solo-learn (paper: 1.5e-6)
    momentum=0.9,          # paper and solo-learn
    eta=0.02,              # LARS trust coefficient; solo-learn (paper: 1e-3)
    warmup_epochs=10,      # linear warm-up, then cosine decay (paper); capped at a tenth of the run
    tau_base=0.99,         # EMA start, cosine to 1; solo-learn (paper: 0.996 on ImageNet)
    tau_schedule="cosine", # cosine (Sec. 3.3) | constant: tau_base throughout (Table 5a's tau = 0 row)
    blur=None,             # Gaussian blur; None = off at 32 px (solo-learn's CIFAR recipe), on above
    joint_views=False,     # one 2N forward pass (BN shared by the views) instead of the paper's two
    seed=0,
    device=None,           # cuda when available, else cpu
    compile=False,         # torch.compile the model
    log_every=50,          # steps between log.jsonl lines (the only host syncs in the loop)
    knn_every=10,          # epochs between kNN top-1 checks on the test split (and at the end); 0 = never
    test_subset=None,      # kNN queries: a fixed random subset of this many test images (default: all)
    probe_lr=0.1,          # online linear probe, its own SGD with momentum 0.9; solo-learn's classifier_lr
    collapse_z_std=0.01,   # warn when z_std stays below this for a whole log interval (healthy: 1/sqrt(proj_dim))
    workers=4,             # threads decoding an ImageFolder (once, then cached)
    out=None,              # run directory; default runs/<time>-<dataset>-<arch>
)
# ----------------------------------------------------------------------------------------------
CHOICES = dict(dataset=data.DATASETS, arch=ARCHS, stem=STEMS, optimizer=("lars", "sgd"), tau_schedule=("cosine", "constant"))


def lr_at(step, total_steps, warmup_steps, peak_lr):
    """Sec. 3.3: linear warm-up to peak_lr over warmup_steps, then cosine decay to 0:
    lr_k = peak_lr * k / W for k < W, else peak_lr * (1 + cos(pi (k - W) / (K - W))) / 2."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def tau_at(step, total_steps, tau_base, schedule="cosine"):
    """Sec. 3.3 (Optimization): tau_k = 1 - (1 - tau_base) * (cos(pi k / K) + 1) / 2, from tau_base at k = 0 to 1 at K.
    tau_base = 1 keeps the target at its random initialisation (Table 5a, 18.8%). schedule="constant"
    keeps tau_base throughout: with 0, the target is the online network at every step (Table 5a, 0.3%)."""
    if schedule == "constant":
        return tau_base
    return 1 - (1 - tau_base) * (math.cos(math.pi * step / total_steps) + 1) / 2


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as the paper uses it (Appendix C; DeepMind's byol/utils/optimizers.py):

        u = g + wd * w,   trust = eta * ||w|| / ||u||  (1 where either norm is 0),
        v <- m * v + trust * u,   w <- w - lr * v.

    The momentum is torch.optim.SGD's form; DeepMind's code puts lr inside v, which differs only
    while lr changes from step to step.

    Groups with lars=False (biases and BatchNorm parameters) skip both the weight decay and the
    trust ratio: plain SGD with momentum. All tensors of a group are updated with foreach ops.
    """

    def __init__(self, params, lr, weight_decay=0.0, momentum=0.9, eta=1e-3):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta, lars=True))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            w = [p for p in group["params"] if p.grad is not None]
            if not w:
                continue
            for p in w:
                if "v" not in self.state[p]:
                    self.state[p]["v"] = torch.zeros_like(p)
            v = [self.state[p]["v"] for p in w]
            u = [p.grad for p in w]
            torch._foreach_mul_(v, group["momentum"])
            if group["lars"]:
                u = torch._foreach_add(u, w, alpha=group["weight_decay"])
                w_norm, u_norm = torch.stack(torch._foreach_norm(w)), torch.stack(torch._foreach_norm(u))
                trust = torch.where((w_norm > 0) & (u_norm > 0), group["eta"] * w_norm / u_norm, 1.0)
                torch._foreach_addcmul_(v, u, list(trust.unbind()))  # v <- m v + trust u, trust on the device
            else:
                torch._foreach_add_(v, u)
            torch._foreach_add_(w, v, alpha=-group["lr"])


def param_groups(model, weight_decay):
    """Appendix C: biases and BatchNorm parameters (every 1-D tensor) are excluded from weight decay
    and from LARS adaptation."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [dict(params=[p for p in params if p.ndim > 1], weight_decay=weight_decay, lars=True),
            dict(params=[p for p in params if p.ndim <= 1], weight_decay=0.0, lars=False)]


def make_optimizer(model, cfg):
    groups = param_groups(model, cfg["weight_decay"])
    if cfg["optimizer"] == "lars":
        return LARS(groups, lr=0.0, momentum=cfg["momentum"], eta=cfg["eta"])
    if cfg["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=cfg["momentum"])
    raise SystemExit(f"error: unknown --optimizer {cfg['optimizer']!r} (lars or sgd)")


def byol_update(model, forward, optimizer, view1, view2, lr, tau):
    """Algorithm 1 once the two views exist: the loss (Eq. 2, symmetrised), one optimizer step on
    theta (online + predictor) at learning rate lr, then the EMA of the target with tau: Eq. 3.
    `forward` is the model or its torch.compile'd wrapper. On CUDA the views go channels_last and
    the forward pass runs in bf16 autocast. Returns the detached loss, y1 and z1 (for the monitors).
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    cuda = view1.is_cuda
    if cuda:
        view1 = view1.contiguous(memory_format=torch.channels_last)
        view2 = view2.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        loss, y1, z1 = forward(view1, view2)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()                                  # theta <- optimizer(theta, grad L)
    model.update_target(tau)                          # xi <- tau xi + (1 - tau) theta
    return loss.detach(), y1, z1


def probe_update(probe, optimizer, y, labels):
    """Online linear probe (DeepMind's byol_experiment.py; solo-learn): one step of a linear classifier
    on the representation y (B x 512), cross-entropy on the batch's labels; images labelled -1 have
    none and are skipped. y is detached here, so no gradient can reach the encoder. Returns the
    numbers of correct and of labelled images as device tensors (no host sync)."""
    known = labels >= 0
    logits = probe(y.detach().float())                                   # B x classes
    loss = F.cross_entropy(logits, labels, ignore_index=-1, reduction="sum") / known.sum().clamp(min=1)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return ((logits.argmax(1) == labels) & known).sum(), known.sum()


def z_std(z):
    """Collapse monitor (SimSiam, Chen & He 2021, Sec. 4.1): the std over the batch of each dimension
    of z / ||z||, averaged over the d dimensions. About 1/sqrt(d) (0.0625 for d = 256) when the
    projections spread over the sphere; 0 when every image maps to the same point."""
    return F.normalize(z.float(), dim=1).std(0).mean()


class Monitor:
    """What the log reports, summed on the device as training runs and read (one host sync) only at
    logging time: the loss and z_std (mean and max over the log interval), and the online probe's
    hits (over the epoch)."""

    def __init__(self, device):
        self.interval = torch.zeros(3, device=device)  # sum of loss, sum of z_std, max of z_std
        self.probe = torch.zeros(2, device=device)     # correct, labelled
        self.steps = 0

    def add(self, loss, z, probe_hits=None):
        s = z_std(z)
        self.interval[:2] += torch.stack([loss.float(), s])
        torch.maximum(self.interval[2], s, out=self.interval[2])
        if probe_hits is not None:
            self.probe += torch.stack(probe_hits)
        self.steps += 1

    def read(self, end_of_epoch):
        """The means since the last read (and the probe's accuracy over the epoch at its end); resets."""
        (loss, s, s_max), (correct, labelled) = self.interval.tolist(), self.probe.tolist()
        out = dict(loss=loss / self.steps, z_std=s / self.steps, z_std_max=s_max)
        self.interval.zero_()
        self.steps = 0
        if end_of_epoch:
            if labelled:
                out["probe_top1"] = correct / labelled
            self.probe.zero_()
        return out


def collapse_warning(z_std_max, threshold, proj_dim, first_step, last_step):
    """The warning to print when z_std stayed below threshold at every step of a log interval, else None.
    A random network is far from collapse (z_std near 1/sqrt(d) from step 0), so there is no warm-up
    grace: one whole interval under the threshold is already a collapse."""
    if z_std_max >= threshold:
        return None
    return (f"warning: the representation is collapsing: z_std stayed below {threshold} at every step "
            f"from {first_step} to {last_step} (at most {z_std_max:.4f}; healthy is about 1/sqrt({proj_dim}) "
            f"= {1 / math.sqrt(proj_dim):.4f}). Check the target's EMA (--tau-base; the recipe's 0.99), "
            f"the learning rate (--base-lr) and the predictor (--no-predictor removes it, the paper's "
            f"Table 5 row that collapses).")


def knn_eval(encoder, images, labels, test, device):
    """Weighted kNN top-1 (k = 200, t = 0.1; test.py) of the online encoder in eval mode (BN running
    statistics): the bank is the labelled training images in memory, the queries the test split.
    Puts the encoder back in train mode."""
    known = labels >= 0
    bank = features(encoder, images[known], device)
    top1 = knn_accuracy(bank, labels[known], features(encoder, test[0], device), test[1])
    encoder.train()
    return top1


def load_test_split(cfg, cache, device):
    """The labelled test split for the kNN monitor, on the device, or None (with a note) when there is none."""
    try:
        # seed 0 whatever the run's seed: every run is scored on the same test images
        x, y = data.load(cfg["data"], cfg["dataset"], "test", cfg["image_size"], cfg["test_subset"],
                         0, cache=cache, workers=cfg["workers"])
    except data.DataError as e:
        print(f"note: no kNN monitor, as there is no labelled test split ({str(e).splitlines()[0]})")
        return None
    return (x[y >= 0].to(device), y[y >= 0].to(device)) if (y >= 0).any() else None


def save_atomic(obj, path):
    """Writes to a temporary file, then renames: a crash mid-write never leaves a broken file."""
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def rng_state(device):
    state = dict(cpu=torch.get_rng_state())
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def parse_args(argv):
    """Command-line flags override DEFAULTS. Returns (config, the flags given explicitly)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=argparse.SUPPRESS)
    for key, value in DEFAULTS.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=f"default {value}")
        else:
            kind = {int: int, float: float}.get(type(value), str)
            if key in ("subset", "test_subset"):
                kind = int
            if key == "blur":
                p.add_argument(flag, action=argparse.BooleanOptionalAction, help="default: off at 32 px, on above")
                continue
            p.add_argument(flag, type=kind, help=f"default {value}", choices=CHOICES.get(key))
    p.add_argument("--resume", nargs="?", const="latest",
                   help="a run directory or checkpoint to continue (no value: the newest run in runs/)")
    args = vars(p.parse_args(argv))
    resume = args.pop("resume", None)
    return {**DEFAULTS, **args}, args, resume


def newest_run(runs="runs"):
    dirs = [os.path.join(runs, d) for d in os.listdir(runs)] if os.path.isdir(runs) else []
    dirs = [d for d in dirs if os.path.isfile(os.path.join(d, "checkpoint.pt"))]
    if not dirs:
        raise SystemExit(f"error: no run with a checkpoint.pt in {runs}/; train one with: python train.py")
    return max(dirs, key=lambda d: os.path.getmtime(os.path.join(d, "checkpoint.pt")))


def load_checkpoint(resume):
    path = newest_run() if resume == "latest" else resume
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.pt")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        assert {"online", "target", "predictor", "optimizer", "step", "config"} <= ckpt.keys()
    except FileNotFoundError:
        raise SystemExit(f"error: no checkpoint at {path}; pass a run directory such as runs/<name>")
    except Exception as e:
        raise SystemExit(f"error: {path} is not a checkpoint written by train.py ({type(e).__name__}: {e})")
    return ckpt, path


def main(argv=None):
    cfg, explicit, resume = parse_args(argv)
    ckpt = None
    if resume:
        ckpt, path = load_checkpoint(resume)
        # The run's own recipe, except what was asked for now (e.g. --device, --epochs to extend it).
        cfg = {**DEFAULTS, **ckpt["config"], "device": None, **explicit, "out": os.path.dirname(path)}
    if cfg["batch_size"] < 2:
        raise SystemExit(f"error: --batch-size {cfg['batch_size']} is too small: BatchNorm needs at "
                         f"least 2 images per batch (the recipe uses 256)")
    device = torch.device(cfg["device"] or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but PyTorch sees no CUDA GPU here; use --device cpu")
    cfg["device"] = str(device)
    torch.manual_seed(cfg["seed"])
    source = os.path.basename(os.path.normpath(cfg["data"])) if data.is_image_folder(cfg["data"]) else cfg["dataset"]
    out = cfg["out"] = cfg["out"] or os.path.join("runs", f"{time.strftime('%Y%m%d-%H%M%S')}-{source}-{cfg['arch']}")

    # Data: the whole training set on the device, as uint8 (augment.py makes the views there).
    cache = os.path.join(os.path.dirname(os.path.abspath(out)), ".cache")
    images, labels = data.load(cfg["data"], cfg["dataset"], "train", cfg["image_size"], cfg["subset"],
                               cfg["seed"], cache=cache, workers=cfg["workers"])
    images, labels = images.to(device), labels.to(device)            # labels: only the monitors see them
    steps_per_epoch = len(images) // cfg["batch_size"]
    if steps_per_epoch == 0:
        raise SystemExit(f"error: --batch-size {cfg['batch_size']} exceeds the {len(images)} training "
                         f"images; lower it or use more data")
    total_steps = cfg["epochs"] * steps_per_epoch
    os.makedirs(out, exist_ok=True)  # only once the data is there: a failed start leaves no empty run
    warmup_steps = min(cfg["warmup_epochs"] * steps_per_epoch, total_steps // 10)
    peak_lr = cfg["base_lr"] * cfg["batch_size"] / 256
    n_classes = int(labels.max()) + 1                                  # 0: no labels, no monitors
    test = load_test_split(cfg, cache, device) if cfg["knn_every"] and n_classes else None

    aug = Augment(cfg["image_size"], blur=cfg["blur"])
    model = BYOL(cfg["arch"], cfg["image_size"], cfg["hidden_dim"], cfg["proj_dim"], cfg["predictor"],
                 cfg["joint_views"], cfg.get("stem")).to(device)
    cuda = device.type == "cuda"
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg)
    # The online probe: its own Linear and optimizer (SGD as solo-learn's classifier, which shares the
    # backbone's lr schedule; ours keeps probe_lr constant), so it can never move the encoder.
    probe, probe_optimizer = None, None
    if n_classes:
        probe = torch.nn.Linear(model.online.projector[0].in_features, n_classes).to(device)
        probe_optimizer = torch.optim.SGD(probe.parameters(), lr=cfg["probe_lr"], momentum=0.9)
    step, perm = 0, None
    if ckpt:
        model.online.load_state_dict(ckpt["online"])
        model.target.load_state_dict(ckpt["target"])
        model.predictor.load_state_dict(ckpt["predictor"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if probe is not None and ckpt.get("probe") is not None:
            probe.load_state_dict(ckpt["probe"])
            probe_optimizer.load_state_dict(ckpt["probe_optimizer"])
        step, perm = ckpt["step"], ckpt["perm"].to(device)
        set_rng_state(ckpt["rng"], device)
    forward = torch.compile(model) if cfg["compile"] else model
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)

    def checkpoint():
        save_atomic(dict(online=model.online.state_dict(), target=model.target.state_dict(),
                         predictor=model.predictor.state_dict(), optimizer=optimizer.state_dict(),
                         probe=probe.state_dict() if n_classes else None,
                         probe_optimizer=probe_optimizer.state_dict() if n_classes else None,
                         epoch=step // steps_per_epoch, step=step, perm=perm.cpu(),
                         rng=rng_state(device), config=cfg), os.path.join(out, "checkpoint.pt"))
        # The encoder alone, as a plain torchvision ResNet state_dict (README: "Use the encoder").
        save_atomic(model.online.encoder.state_dict(), os.path.join(out, "encoder.pt"))

    log = open(os.path.join(out, "log.jsonl"), "a")
    monitor, t_log, warned, shown = Monitor(device), time.perf_counter(), False, {}

    def report(lr, tau, end_of_epoch):
        """One log.jsonl line (the loop's only host syncs), the kNN check when due, the collapse warning."""
        nonlocal t_log, warned
        steps, dt = monitor.steps, time.perf_counter() - t_log
        record = dict(epoch=step / steps_per_epoch, step=step, lr=lr, tau=tau,
                      images_per_s=steps * cfg["batch_size"] / dt, **monitor.read(end_of_epoch))
        epoch = step // steps_per_epoch
        if test and end_of_epoch and not stop and (epoch % cfg["knn_every"] == 0 or step == total_steps):
            record["knn_top1"] = knn_eval(model.online.encoder, images, labels, test, device)
        log.write(json.dumps(record) + "\n")
        log.flush()
        warning = collapse_warning(record["z_std_max"], cfg["collapse_z_std"], cfg["proj_dim"],
                                   step - steps + 1, step)
        if warning and not warned:
            tqdm.write(warning)
            warned = True
        shown.update({k: f"{record[k]:.4f}" for k in ("loss", "z_std", "probe_top1", "knn_top1") if k in record})
        bar.set_postfix(**shown, lr=f"{lr:.3g}", tau=f"{tau:.4f}")
        t_log = time.perf_counter()

    bar = tqdm(total=total_steps, initial=step, desc=os.path.basename(out), unit="step", dynamic_ncols=True)
    model.train()
    # Ctrl-C finishes the step under way, saves, and exits; a second Ctrl-C stops at once (the
    # checkpoint on disk is then the last complete one, never a half-written file).
    stop = []

    def on_sigint(signum, frame):
        if stop:
            raise KeyboardInterrupt
        stop.append(signum)
    signal.signal(signal.SIGINT, on_sigint)
    # Algorithm 1, one iteration per step k.
    while step < total_steps and not stop:
        i = step % steps_per_epoch
        if i == 0 or perm is None:
            perm = torch.randperm(len(images), device=device)
        lr = lr_at(step, total_steps, warmup_steps, peak_lr)           # Sec. 3.3, cosine lr
        tau = tau_at(step, total_steps, cfg["tau_base"], cfg["tau_schedule"])  # Sec. 3.3
        batch = perm[i * cfg["batch_size"]:(i + 1) * cfg["batch_size"]]
        x = images[batch]                                               # B x 3 x H x W uint8
        view1, view2 = aug(x)                                           # v ~ T(x), v' ~ T'(x)
        loss, y1, z1 = byol_update(model, forward, optimizer, view1, view2, lr, tau)
        step += 1
        # Monitors, outside Algorithm 1: the online probe on y1 and the collapse monitor on z1.
        monitor.add(loss, z1, probe_update(probe, probe_optimizer, y1, labels[batch]) if n_classes else None)
        bar.update()
        end_of_epoch = step % steps_per_epoch == 0 or step == total_steps
        if step % cfg["log_every"] == 0 or end_of_epoch or stop:
            report(lr, tau, end_of_epoch)
        if end_of_epoch or stop:
            checkpoint()
    bar.close()
    log.close()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if stop:
        raise SystemExit(f"\nInterrupted at step {step}/{total_steps}; saved {out}/checkpoint.pt. "
                         f"Continue with: python train.py --resume {out}")
    print(f"Done: {out}/encoder.pt. Evaluate with: python test.py {out}")
    return out


if __name__ == "__main__":
    try:
        main()
    except data.DataError as e:
        raise SystemExit(f"error: {e}")
    except KeyboardInterrupt:
        raise SystemExit("\nStopped. The last complete checkpoint is kept; continue with --resume.")
