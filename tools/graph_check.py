"""The CUDA graph of train.py --cuda-graph (devices.StepGraph), checked before anything is timed (issue 18).
Not part of the library: nothing imports this file.

    python tools/graph_check.py --device cuda              # the recipe's model and batch 256
    python tools/graph_check.py --device cpu --batch-size 8 --hidden-dim 32   # the graph-ready step

The step is train.py's own, train.byol_step (the views, byol_update with the recipe's LARS, the monitors' sums and the
online probe), with its first view also copied out so that the check can see what a replay drew:
1. two replays of the same batch draw different views (the graph's random numbers move on);
2. a replay at lr 0 leaves the online weights exactly as they were (lr is read at replay, not capture);
3. at lr 0 and a tau set after capture, the target moves to xi + (1 - tau)(theta - xi) (Eq. 1);
4. one replay and one eager step from the same state, RNG included, move the weights alike: the
   relative difference of their updates is within bf16's (on the CPU, where a call runs the step
   eagerly, they are equal).
One line per check, then one JSON line (the last line) with the figures and whether each holds.
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
from optim import make_optimizer
from train import DEFAULTS, byol_step
from machinery.budget import state_tensors
from machinery.devices import StepGraph, pick_device, prepare
from machinery.monitors import Monitor


def build(args, device):
    """train.py's step on a fresh model, as a StepGraph, and the buffer its first view is copied into."""
    torch.manual_seed(0)
    cfg = {**DEFAULTS, "hidden_dim": args.hidden_dim}
    model = BYOL("resnet18", 32, cfg["hidden_dim"], cfg["proj_dim"]).to(device)
    forward, optimizer, aug = prepare(model, device, graphed=True), make_optimizer(model, cfg), Augment(32)
    batches = SimpleNamespace(labels=torch.arange(10, device=device), steps_per_epoch=1)
    monitor = Monitor(model, batches, None, cfg, device)
    seen = torch.zeros(args.batch_size, 3, 32, 32, device=device)

    def seeing_aug(x):  # train.py's views, the first also copied where the checks can see it
        view1, view2 = aug(x)
        seen.copy_(view1)
        return view1, view2
    one_step = partial(byol_step, seeing_aug, model, forward, optimizer, monitor)
    return model, optimizer, monitor, one_step, StepGraph(one_step, device), seen


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", help="cuda (default when available) or cpu")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--hidden-dim", type=int, default=DEFAULTS["hidden_dim"])
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
    checks["two replays draw different views"] = figures["views_max_difference"] > 0.1

    online, target = params(model.online), params(model.target)
    graph(x, labels, 0.0, 0.5)
    checks["lr 0 leaves the online weights unchanged"] = all(
        torch.equal(a, b) for a, b in zip(online, model.online.parameters()))
    expected = [xi + 0.5 * (theta - xi) for xi, theta in zip(target, online)]
    figures["ema_max_error"] = max((e - xi).abs().max().item() for e, xi in zip(expected, model.target.parameters()))
    checks["the target moves by (1 - tau)(theta - xi) for a tau set after capture"] = figures["ema_max_error"] < 1e-5

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
    checks["one replay equals one eager step within bf16 tolerance"] = figures["replay_vs_eager_relative"] < 0.05

    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    print(json.dumps(dict(device=str(device), batch_size=args.batch_size, **figures, checks=checks,
                          all_hold=all(checks.values()))))
    return checks


if __name__ == "__main__":
    sys.exit(0 if all(main().values()) else 1)
