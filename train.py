"""BYOL pretraining (Grill et al. 2020, arXiv 2006.07733): the recipe, then Algorithm 1.

    python train.py                                   # CIFAR-10, ResNet-18, the recipe below
    python train.py --data path/to/train --epochs 3   # any ImageFolder
    python train.py --resume runs/<name>              # continue exactly where it stopped

The rest lives in machinery/, which a reader of the paper can skip: flags (the command line), batches
(what each step reads), devices, runs (run folder, checkpoints, signals), monitors, budget (--minutes).
"""
from machinery import startup  # noqa: F401  (first: Ctrl-C while torch loads is one line, not a traceback)
from functools import partial

import torch

from augment import STATS, Augment
from models import BYOL
from optim import lr_at, make_optimizer, tau_at
from machinery.batches import training_data
from machinery.budget import plan_minutes, time_trial
from machinery.devices import StepGraph, prepare, start_processes
from machinery.flags import configure
from machinery.monitors import Monitor
from machinery.runs import Run, cli

# ----------------------------------------------------------------------------------------------
# The recipe. "paper" = Grill et al. 2020, arXiv v3 (ImageNet: Sec. 3.3, hyper-parameters in Appendix J.1); the paper
# has no CIFAR setting, so CIFAR-10 values come from solo-learn's scripts/pretrain/cifar/byol.yaml (ResNet-18;
# its online linear classifier: 92.58% top-1 after 1000 epochs).
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
    minutes=None,          # instead of --epochs: as many epochs as fit in this many minutes of training here
    batch_size=256,        # solo-learn (paper: 4096 on 512 TPU cores)
    optimizer="lars",      # lars (paper) | sgd
    base_lr=1.0,           # lr = base_lr * batch_size / 256; solo-learn (paper: 0.2)
    weight_decay=1e-5,     # solo-learn (paper: 1.5e-6)
    momentum=0.9,          # paper (Appendix J.1) and solo-learn
    eta=0.02,              # LARS trust coefficient; solo-learn (paper: 1e-3, Appendix J.1)
    lars_clip=True,        # solo-learn's clip_lr: steps of min(trust, lr); --no-lars-clip: DeepMind's code's LARS
    warmup_epochs=10,      # linear warm-up, then cosine decay (paper); capped at a tenth of the run
    tau_base=0.99,         # EMA start, cosine to 1; solo-learn (paper: 0.996 on ImageNet)
    tau_schedule="cosine", # cosine (Sec. 3.3) | constant: tau_base throughout (Table 5a's tau = 0 row)
    blur=None,             # Gaussian blur; None = off at 32 px (solo-learn's CIFAR recipe), on above
    crop_min_scale=0.08,   # random resized crops cover [0.08, 1] of the image (paper, Appendix B)
    normalize="cifar10",   # the (mean, std) of augment.STATS the views and features are normalised with
    seed=0,
    device=None,           # cuda when available, else cpu
    compile=False,         # torch.compile the model
    cuda_graph=False,      # replay each step as one CUDA graph (devices.StepGraph); off until measured on a GPU
    log_every=50,          # steps between log.jsonl lines (the only host syncs in the loop)
    save_minutes=1.0,      # checkpoint at the first epoch end after a minute (0: every epoch), the end, Ctrl-C
    knn_every=10,          # epochs between test-split checks, kNN and online probe (and at the end); 0 = never
    test_subset=None,      # kNN queries: a fixed random subset of this many test images (default: all)
    probe_lr=0.1,          # online linear probe, its own SGD with momentum 0.9; solo-learn's classifier_lr
    collapse_z_std=0.01,   # warn when z_std stays below this for a whole log interval (healthy: 1/sqrt(proj_dim))
    workers=4,             # threads decoding an ImageFolder (once, then cached); --stream: DataLoader workers (0: none)
    stream=False,          # --stream: read an ImageFolder from disk every epoch, for sets larger than memory
    out=None,              # run directory; default runs/<time>-<dataset>-<arch>
    cache_dir=None,        # decoded ImageFolders are kept here; default this user's ~/.cache/byol-reproduction
    recipe="cifar10",      # cifar10: this block | imagenet: the paper's (IMAGENET below) in its place
)
# The paper's own recipe, ImageNet with ResNet-50 (Sec. 3.3, Appendices B and J.1): --recipe imagenet puts
# these in place of the values above; flags still win. Not run here: docs/scale.md.
IMAGENET = dict(
    arch="resnet50",       # Sec. 3.3 (74.3% linear top-1, Table 1)
    image_size=224,        # Appendix B: crops resized to 224 x 224
    stem="imagenet",       # torchvision's ResNet-50 as it is
    batch_size=4096,       # Sec. 3.3: 4096, over 512 TPU v3 cores; the global batch under torchrun
    optimizer="lars",      # Sec. 3.3
    base_lr=0.2,           # Sec. 3.3: lr = 0.2 x batch / 256
    weight_decay=1.5e-6,   # Sec. 3.3
    eta=1e-3,              # Appendix J.1: LARS trust coefficient (trust_coef)
    lars_clip=False,       # no clip: DeepMind's code (byol/utils/optimizers.py); the paper names LARS only
    epochs=1000,           # Sec. 3.3
    warmup_epochs=10,      # Sec. 3.3
    tau_base=0.996,        # Sec. 3.3
    blur=True,             # Appendix B, Table 6: blur p 1.0 (view 1) and 0.1 (view 2), kernel 23 px at 224
    normalize="imagenet",  # ImageNet's mean and std
    stream=True,           # 1.28M images at 224 px are about 190 GB as uint8: read from disk
    knn_every=0,           # the kNN monitor needs the training set in memory; the online probe remains
)
RECIPES = dict(cifar10={}, imagenet=IMAGENET)


def byol_update(model, forward, optimizer, view1, view2, lr, tau):
    """Algorithm 1 once the two views exist: the loss (Eq. 2, symmetrised), one optimizer step on
    theta (online + predictor) at learning rate lr, then the EMA of the target with tau (Eq. 1).
    forward is devices.prepare(model, ...): it decides precision and memory format. Returns the
    detached loss, y1 and z1 (for the monitors)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss, y1, z1 = forward(view1, view2)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()                                  # theta <- optimizer(theta, grad L)
    model.update_target(tau)                          # xi <- tau xi + (1 - tau) theta
    return loss.detach(), y1, z1


def byol_step(aug, model, forward, optimizer, monitor, x, labels, lr, tau):
    """The loop's step on a batch x: the two views, byol_update, and the monitors' sums on the device."""
    view1, view2 = aug(x)                                                # v ~ T(x), v' ~ T'(x)
    loss, y1, z1 = byol_update(model, forward, optimizer, view1, view2, lr, tau)
    monitor.add(loss, y1, z1, labels)                                    # probe, z_std: outside Algorithm 1


def main(argv=None):
    cfg, ckpt = configure(argv, DEFAULTS, RECIPES, __doc__)           # the flags; a resumed run's own recipe
    device, rank, world = start_processes(cfg["device"])             # torchrun: one process per GPU
    cfg["device"] = str(device)
    torch.manual_seed(cfg["seed"])
    # Data: the training set on the device as uint8 (--stream: from disk); the test split for the monitors.
    batches, test = training_data(cfg, device, rank, world)

    # Sec. 3.1: online (f, g), predictor q and target (f, g); precision and memory format decided once.
    aug = Augment(cfg["image_size"], cfg["blur"], *STATS[cfg["normalize"]], scale=(cfg["crop_min_scale"], 1))
    model = BYOL(cfg["arch"], cfg["image_size"], cfg["hidden_dim"], cfg["proj_dim"], cfg["predictor"],
                 cfg["stem"]).to(device)
    forward = prepare(model, device, cfg["compile"], distributed=world > 1, graphed=cfg["cuda_graph"])
    optimizer = make_optimizer(model, cfg)                                       # Sec. 3.3, LARS
    monitor = Monitor(model, batches, test, cfg, device, master=rank == 0)      # outside Algorithm 1
    train_step = partial(byol_step, aug, model, forward, optimizer, monitor)    # train_step(x, labels, lr, tau)
    if cfg["cuda_graph"]:
        train_step = StepGraph(train_step, device)                     # the same step, replayed as one CUDA graph

    with Run(cfg, ckpt, model, optimizer, monitor, batches, device, rank, world) as run:
        if cfg["minutes"]:  # time train_step, a test-split check and a save here; fit the schedule in
            times = time_trial(train_step, batches.random, monitor.check if test else None, run.scratch_save,
                               [model, optimizer, monitor], device)
            cfg["epochs"] = plan_minutes(cfg, batches.steps_per_epoch, times, world, device)
        # Sec. 3.3: lr scaled linearly with the batch, warm-up then cosine; capping the warm-up at a tenth is ours.
        total_steps = cfg["epochs"] * batches.steps_per_epoch
        warmup_steps = min(cfg["warmup_epochs"] * batches.steps_per_epoch, total_steps // 10)
        peak_lr = cfg["base_lr"] * cfg["batch_size"] / 256
        k = run.begin(total_steps)                                       # restores a checkpoint: exact resume
        while k < total_steps and not run.stopping:                      # Algorithm 1, step k
            lr = lr_at(k, total_steps, warmup_steps, peak_lr)            # Sec. 3.3, cosine lr
            tau = tau_at(k, total_steps, cfg["tau_base"], cfg["tau_schedule"])  # Sec. 3.3, cosine tau
            x, labels = batches.at(k)                                    # B ~ D (labels: monitors only)
            train_step(x, labels, lr, tau)                               # views, loss, theta's step, xi's EMA
            k += 1
            run.bar.update()
            if run.log_due(k):                                           # the loop's only host syncs
                run.log(k, lr=lr, tau=tau, **monitor.read(k, total_steps, run.stopping))
            if run.save_due(k):                                          # --save-minutes, the end, a signal
                run.save(k)
    return cfg["out"]


if __name__ == "__main__":
    cli(main)
