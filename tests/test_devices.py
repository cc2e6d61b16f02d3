"""devices.py: the step that a CUDA graph replays (StepGraph), checked on the CPU, where a call runs the
same step eagerly on the graph's static buffers with lr and tau as device tensors."""
import copy
from functools import partial

import pytest
import torch

from augment import Augment
from optim import make_optimizer
from machinery.devices import StepGraph
from machinery.monitors import Monitor
from tests.conftest import small_byol
from train import DEFAULTS, byol_step


class _Batches:
    labels, steps_per_epoch = torch.tensor([0, 1, 2, 3]), 4


def _setup():
    """A small BYOL with the recipe's LARS, its monitor with a probe, and the loop's step as one callable."""
    model = small_byol()
    optimizer = make_optimizer(model, DEFAULTS)
    monitor = Monitor(model, _Batches(), None, {**DEFAULTS, "proj_dim": 16}, torch.device("cpu"))
    return model, optimizer, monitor, partial(byol_step, Augment(32), model, model, optimizer, monitor)


def _state(model, optimizer, monitor):
    return copy.deepcopy((model.state_dict(), optimizer.state_dict()["state"], monitor.probe.state_dict(),
                          monitor.interval, monitor.hits))


def _equal(a, b):
    if torch.is_tensor(a):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return all(_equal(x, y) for x, y in zip(a, b))


def test_the_graph_ready_step_equals_the_loops_step_and_takes_each_lr_and_tau():
    """Four steps through StepGraph (static buffers, lr and tau filled into device tensors) and four through
    the loop's own step with Python floats: the same weights, target, BatchNorm statistics, LARS state,
    probe and monitor sums after every step. lr and tau change at every step (a value frozen at the first
    call would show), and the first step, at lr 0, leaves the online weights where they were."""
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=g) for _ in range(4)]
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, -1])
    schedule = [(0.0, 0.99), (0.5, 0.9), (2.0, 0.999), (0.1, 0.0)]
    eager, graphed = _setup(), _setup()
    graph = StepGraph(graphed[3], torch.device("cpu"))
    online = copy.deepcopy(eager[0].online.state_dict())
    for i, ((lr, tau), x) in enumerate(zip(schedule, batches)):
        torch.manual_seed(i)
        eager[3](x, labels, lr, tau)
        torch.manual_seed(i)
        graph(x, labels, lr, tau)
        assert _equal(_state(*eager[:3]), _state(*graphed[:3])), f"step {i} differs"
        if i == 0:
            params = {k for k, _ in eager[0].online.named_parameters()}
            assert all(torch.equal(v, online[k]) for k, v in eager[0].online.state_dict().items() if k in params)
    assert graph.calls == 4 and graph.lr.item() == pytest.approx(0.1) and graph.tau.item() == 0.0
    assert eager[2].interval[3].item() == graphed[2].interval[3].item() == 4    # steps counted on the device
    assert not _equal(eager[0].target.state_dict(), _setup()[0].target.state_dict())  # the EMA moved it


def test_the_gpu_graph_check_holds_for_the_graph_ready_step_on_the_cpu(capsys):
    """tools/graph_check.py, the checks a GPU lease runs before timing the CUDA graph, run here on
    the graph-ready step: each holds (a broken check, or a broken step, would show here first). Its loss
    curves, graph and eager, are equal here, where a call runs the step eagerly: two runs that did not
    start from the same weights, seed and batches would part, and the GPU's comparison would mean nothing."""
    import json
    import importlib.util
    import os
    from tests.conftest import ROOT
    spec = importlib.util.spec_from_file_location("graph_check", os.path.join(ROOT, "tools", "graph_check.py"))
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    results = check.main(["--device", "cpu", "--batch-size", "8", "--hidden-dim", "32", "--steps", "4"])
    assert len(results) == 5 and all(results.values()), results
    figures = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert figures["all_hold"] and figures["loss_curve_max_gap"] == 0.0
    assert figures["loss_eager_first_last"] == figures["loss_graph_first_last"]
