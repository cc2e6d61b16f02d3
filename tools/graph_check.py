"""The CUDA graph of train.py --cuda-graph (devices.StepGraph), checked before anything is timed (issue 18).
Not part of the library: nothing imports this file.

    python tools/graph_check.py --device cuda --data data/cifar10-jpg/train   # the recipe's model, batch 256
    python tools/graph_check.py --device cpu --batch-size 8 --hidden-dim 32 --steps 4   # the graph-ready step

The step is train.py's own, train.byol_step (the views, byol_update with the recipe's LARS, the monitors' sums and the
online probe), with its first view also copied out so that the check can see what a replay drew:
1. two replays of the same batch draw different views (the graph's random numbers move on);
2. a replay at lr 0 leaves the online weights exactly as they were (lr is read at replay, not capture);
3. at lr 0 and a tau set after capture, the target moves to xi + (1 - tau)(theta - xi) (Eq. 1);
4. one replay and one eager step from the same state, RNG included, move the weights alike: the
   relative difference of their updates is within bf16's (on the CPU, where a call runs the step
   eagerly, they are equal);
5. --steps graph replays and as many eager steps (train.py's step without --cuda-graph), each from the
   same initial weights and seed, on the same batches, with the recipe's lr and tau schedules fitted into
   the steps: their loss curves, averaged over tenths of the run, differ by less than 5% of the eager
   loss at every tenth (a graph that froze lr, the weights or the views would part from the eager curve
   as the loss falls; on the CPU the curves are equal).
One line per check as it is decided, then one JSON line (the last line) with the figures and whether each holds.
"""
import argparse
import json
import os
import sys
from functools import partial
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's own modules
from augment import Augment  # (the project's own parts, as train.py builds them)
from models import BYOL
from optim import lr_at, make_optimizer, tau_at
from train import DEFAULTS, byol_step
from machinery import data
from machinery.budget import state_tensors
from machinery.devices import StepGraph, pick_device, prepare
from machinery.monitors import Monitor


def build(args, device, graphed=True):
    """train.py's step on a fresh model (the same weights every call), as a StepGraph, and the buffer its first
    view is copied into; graphed=False: the step as train.py runs it without --cuda-graph."""
    torch.manual_seed(0)
    cfg = {**DEFAULTS, "hidden_dim": args.hidden_dim}
    model = BYOL("resnet18", 32, cfg["hidden_dim"], cfg["proj_dim"]).to(device)
    forward, optimizer, aug = prepare(model, device, graphed=graphed), make_optimizer(model, cfg), Augment(32)
    batches = SimpleNamespace(labels=torch.arange(10, device=device), steps_per_epoch=1)
    monitor = Monitor(model, batches, None, cfg, device)
    seen = torch.zeros(args.batch_size, 3, 32, 32, device=device)

    def seeing_aug(x):  # train.py's views, the first also copied where the checks can see it
        view1, view2 = aug(x)
        seen.copy_(view1)
        return view1, view2
    one_step = partial(byol_step, seeing_aug, model, forward, optimizer, monitor)
    return model, optimizer, monitor, one_step, StepGraph(one_step, device), seen


def images_for(args, device):
    """(uint8 images, labels) on the device: --images real ones from --data, or random ones."""
    if args.data:
        images, labels = data.load(args.data, split="train", subset=args.images, workers=os.cpu_count() or 1)
    else:
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8, generator=g)
        labels = torch.randint(0, 10, (args.images,), generator=g)
    return images.to(device), labels.to(device)


def loss_curve(args, device, graphed, images, labels):
    """The loss at each of --steps steps from the initial weights of build() and seed 1, on batches drawn
    with seed 2, the recipe's schedules over the steps; as a graph (the warm-up and capture calls are
    steps too) or eagerly. The loss of a step is what it adds to the monitor's sum."""
    model, optimizer, monitor, one_step, graph, _ = build(args, device, graphed)
    step, sums = graph if graphed else one_step, []
    order = torch.randint(0, len(images), (args.steps, args.batch_size), generator=torch.Generator().manual_seed(2))
    peak_lr, warmup = DEFAULTS["base_lr"] * args.batch_size / 256, args.steps // 10
    torch.manual_seed(1)
    for k in range(args.steps):
        batch = order[k].to(device)
        step(images[batch], labels[batch], lr_at(k, args.steps, warmup, peak_lr),
             tau_at(k, args.steps, DEFAULTS["tau_base"]))
        sums.append(monitor.interval[0].clone())                 # the loss summed so far, on the device
    return torch.diff(torch.stack(sums), prepend=torch.zeros(1, device=device)).cpu()


def hold(checks, name, ok):
    """Records one check and says at once whether it holds (a run stopped at its time limit shows how far it got)."""
    checks[name] = bool(ok)
    print(f"{'PASS' if ok else 'FAIL'}  {name}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", help="cuda (default when available) or cpu")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--hidden-dim", type=int, default=DEFAULTS["hidden_dim"])
    p.add_argument("--steps", type=int, default=300, help="steps of each loss curve (check 5; default 300)")
    p.add_argument("--data", help="an ImageFolder for check 5's batches (default: random uint8 images)")
    p.add_argument("--images", type=int, default=4096, help="how many of its images (default 4096)")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    model, optimizer, monitor, one_step, graph, seen = build(args, device)
    x = torch.randint(0, 256, (args.batch_size, 3, 32, 32), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10, (args.batch_size,), device=device)
    for _ in range(graph.warmup + 1):                        # warm-up, then the capture (and its replay)
        graph(x, labels, 0.1, 0.99)
    params = lambda net: [p.detach().clone() for p in net.parameters()]  # noqa: E731
    checks, figures = {}, {}

    graph(x, labels, 0.1, 0.99)
    first = seen.clone()
    graph(x, labels, 0.1, 0.99)
    figures["views_max_difference"] = (seen - first).abs().max().item()
    hold(checks, "two replays draw different views", figures["views_max_difference"] > 0.1)

    online, target = params(model.online), params(model.target)
    graph(x, labels, 0.0, 0.5)
    hold(checks, "lr 0 leaves the online weights unchanged",
         all(torch.equal(a, b) for a, b in zip(online, model.online.parameters())))
    expected = [xi + 0.5 * (theta - xi) for xi, theta in zip(target, online)]
    figures["ema_max_error"] = max((e - xi).abs().max().item() for e, xi in zip(expected, model.target.parameters()))
    hold(checks, "the target moves by (1 - tau)(theta - xi) for a tau set after capture",
         figures["ema_max_error"] < 1e-5)

    state = [model, optimizer, monitor]
    saved = [t.clone() for t in state_tensors(*state)]
    rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()
    start = params(model.online)
    graph(x, labels, 0.5, 0.9)
    replayed = [a - b for a, b in zip(params(model.online), start)]
    with torch.no_grad():
        for t, s in zip(state_tensors(*state), saved):
            t.copy_(s)
    torch.cuda.set_rng_state(rng, device) if device.type == "cuda" else torch.set_rng_state(rng)
    one_step(graph.x, graph.labels, graph.lr, graph.tau)            # the same step, eagerly, from the same state
    eager = [a - b for a, b in zip(params(model.online), start)]
    difference = sum((r - e).norm() ** 2 for r, e in zip(replayed, eager)) ** 0.5
    figures["replay_vs_eager_relative"] = (difference / sum(e.norm() ** 2 for e in eager) ** 0.5).item()
    hold(checks, "one replay equals one eager step within bf16 tolerance", figures["replay_vs_eager_relative"] < 0.05)
    del model, optimizer, monitor, one_step, graph

    images, labels = images_for(args, device)
    graph_curve, eager_curve = (loss_curve(args, device, graphed, images, labels) for graphed in (True, False))
    tenths = lambda curve: torch.stack([part.mean() for part in curve.tensor_split(min(10, args.steps))])  # noqa: E731
    gap = ((tenths(graph_curve) - tenths(eager_curve)).abs() / tenths(eager_curve)).max().item()
    figures.update(loss_curve_max_gap=gap, loss_eager_first_last=[eager_curve[0].item(), eager_curve[-1].item()],
                   loss_graph_first_last=[graph_curve[0].item(), graph_curve[-1].item()])
    hold(checks, f"{args.steps} graph steps track the eager loss curve from the same seed", gap < 0.05)
    print(json.dumps(dict(device=str(device), batch_size=args.batch_size, **figures, checks=checks,
                          all_hold=all(checks.values()))))
    return checks


if __name__ == "__main__":
    sys.exit(0 if all(main().values()) else 1)
