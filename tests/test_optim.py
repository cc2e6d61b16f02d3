"""optim.py: the lr and tau schedules at their endpoints, the parameters LARS adapts, and LARS itself
against a per-tensor reference in both of its forms."""
import math

import pytest
import torch

from optim import LARS, lr_at, param_groups, tau_at
import optim
from tests.conftest import small_byol


def test_tau_schedule_endpoints_and_midpoint():
    assert tau_at(0, 1000, 0.99) == pytest.approx(0.99)
    assert tau_at(500, 1000, 0.99) == pytest.approx(0.995)
    assert tau_at(1000, 1000, 0.99) == pytest.approx(1.0)
    taus = [tau_at(k, 1000, 0.996) for k in range(0, 1001, 50)]
    assert all(a < b for a, b in zip(taus, taus[1:])), "tau must rise monotonically to 1"


def test_lr_warmup_then_cosine():
    K, W, peak = 1000, 100, 2.0
    assert lr_at(0, K, W, peak) == 0.0
    assert lr_at(50, K, W, peak) == pytest.approx(1.0)
    assert lr_at(W, K, W, peak) == pytest.approx(peak)
    assert lr_at(W + (K - W) // 2, K, W, peak) == pytest.approx(peak / 2)
    assert lr_at(K, K, W, peak) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(10, 100, 0, peak) == pytest.approx(peak * (1 + math.cos(math.pi * 0.1)) / 2)


def test_tau_ablation_settings():
    assert all(optim.tau_at(k, 100, 1.0) == 1.0 for k in range(101))       # target stays random
    assert all(optim.tau_at(k, 100, 0.0, "constant") == 0.0 for k in range(101))  # target = online
    assert optim.tau_at(50, 100, 0.0) == pytest.approx(0.5)                # the cosine would not be


def test_param_groups_exclude_biases_and_batchnorm():
    model = small_byol()
    adapted, excluded = param_groups(model, 1e-5)
    names = {id(p): n for n, p in model.named_parameters()}
    excluded_names = {names[id(p)] for p in excluded["params"]}
    assert excluded["weight_decay"] == 0 and not excluded["lars"]
    assert adapted["weight_decay"] == 1e-5 and adapted["lars"]
    assert "online.encoder.bn1.weight" in excluded_names and "online.encoder.bn1.bias" in excluded_names
    assert "online.projector.0.bias" in excluded_names and "predictor.1.weight" in excluded_names
    assert all(p.ndim > 1 for p in adapted["params"])
    assert not any(p is q for p in model.target.parameters() for q in adapted["params"] + excluded["params"])


def _lars_reference(params, grads, state, lr, wd, eta, m, clip, adapted, eps=1e-8):
    """One LARS step, tensor by tensor, from the formulas (solo-learn's clipped form, or DeepMind's code's)."""
    clipped = []
    for i, (w, g) in enumerate(zip(params, grads)):
        if not adapted[i]:
            u = g                                              # biases and BN: plain SGD, no decay
        elif clip:
            wn, gn = w.norm().item(), g.norm().item()
            if wn > 0 and gn > 0:
                trust = eta * wn / (gn + wd * wn + eps)
                scale = min(trust / lr, 1.0) if lr > 0 else 1.0
                clipped.append(lr > 0 and trust > lr)
                u = scale * (g + wd * w)
            else:
                u = g
        else:
            u = g + wd * w
            wn, un = w.norm().item(), u.norm().item()
            u = (eta * wn / un if wn > 0 and un > 0 else 1.0) * u
        state[i] = m * state[i] + u
        params[i] = w - lr * state[i]
    return clipped


@pytest.mark.parametrize("clip", [True, False])
def test_lars_equals_a_per_tensor_reference_over_several_steps(clip):
    """Five steps with a changing lr (0 at the first, as the warm-up starts): two adapted tensors whose
    gradients differ 1000x in scale (so the clip is active on one and not the other), an adapted
    tensor with a zero gradient, and an excluded bias."""
    g = torch.Generator().manual_seed(0)
    shapes, adapted = [(8, 4), (16, 3), (5, 5), (8,)], [True, True, True, False]
    ps = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    opt = LARS([dict(params=ps[:3], weight_decay=0.1, lars=True), dict(params=ps[3:], weight_decay=0.0, lars=False)],
               lr=0.0, momentum=0.9, eta=0.02, clip=clip)
    ref, state, clipped = [p.detach().clone() for p in ps], [torch.zeros(s) for s in shapes], []
    for lr in (0.0, 0.05, 0.2, 1.0, 0.5):
        grads = [torch.randn(s, generator=g) * scale for s, scale in zip(shapes, (1.0, 1e-3, 0.0, 1.0))]
        for p, grad in zip(ps, grads):
            p.grad = grad.clone()
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        clipped += _lars_reference(ref, grads, state, lr, 0.1, 0.02, 0.9, clip, adapted)
        for p, r in zip(ps, ref):
            torch.testing.assert_close(p.detach(), r, atol=1e-6, rtol=1e-5)
    if clip:
        assert any(clipped) and not all(clipped)  # both regimes were exercised


def test_lars_modes_differ_where_the_clip_binds():
    """The clipped and DeepMind's unclipped LARS are not the same rule: one step at lr 0.1 on a tensor with a
    small gradient (trust >> lr) moves 0.1 * u clipped, and trust * 0.1 * u unclipped."""
    w = torch.nn.Parameter(torch.ones(4, 4))
    steps = {}
    for clip in (True, False):
        p = torch.nn.Parameter(w.detach().clone())
        p.grad = torch.full((4, 4), 1e-3)
        opt = LARS([dict(params=[p], weight_decay=0.0, lars=True)], lr=0.1, momentum=0.9, eta=0.02, clip=clip)
        opt.step()
        steps[clip] = (w - p).detach()
    trust = 0.02 * 4 / (1e-3 * 4)                                           # ||w|| = 4, ||g|| = 4e-3
    torch.testing.assert_close(steps[True], torch.full((4, 4), 0.1 * 1e-3))
    torch.testing.assert_close(steps[False], torch.full((4, 4), 0.1 * trust * 1e-3))


@pytest.mark.parametrize("clip", [True, False])
def test_lars_takes_its_lr_as_a_device_tensor_and_gives_the_same_step(clip):
    """A CUDA graph reads lr from a 0-dim tensor (devices.StepGraph): the same numbers as a Python float,
    lr 0 included (no step, and no division by it), and a new value at every step."""
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=g) for s in ((8, 4), (16, 3), (8,))]
    runs = []
    for as_tensor in (False, True):
        ps = [torch.nn.Parameter(w.clone()) for w in start]
        opt = LARS([dict(params=ps[:2], weight_decay=0.1, lars=True), dict(params=ps[2:], weight_decay=0.0,
                                                                            lars=False)], lr=0.0, eta=0.02, clip=clip)
        for step, lr in enumerate((0.0, 0.05, 1.0)):
            for p, s in zip(ps, (1.0, 1e-3, 1.0)):
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step)) * s
            for group in opt.param_groups:
                group["lr"] = torch.tensor(lr) if as_tensor else lr
            opt.step()
            if step == 0:
                assert all(torch.equal(p, w) for p, w in zip(ps, start))
        runs.append([p.detach() for p in ps])
    assert all(torch.equal(a, b) for a, b in zip(*runs)) and not torch.equal(runs[0][0], start[0])


def test_sgd_is_lars_without_the_trust_ratio_and_steps_as_torch_sgd():
    """--optimizer sgd runs on the LARS class with every group's trust ratio off (so a CUDA graph can read
    its lr from the device): three steps equal torch.optim.SGD's with momentum and weight decay on the
    weights (not on biases and BN), the setting it replaced."""
    torch.manual_seed(0)
    a, b = small_byol(), small_byol()
    ours = optim.make_optimizer(a, dict(optimizer="sgd", weight_decay=1e-3, momentum=0.9, eta=0.02, lars_clip=True))
    theirs = torch.optim.SGD(optim.param_groups(b, 1e-3), lr=0.0, momentum=0.9)
    assert not any(group["lars"] for group in ours.param_groups)
    for lr in (0.1, 0.5, 0.2):
        grads = [torch.randn_like(p) for p in a.parameters() if p.requires_grad]
        for opt, model in ((ours, a), (theirs, b)):
            for p, grad in zip([p for p in model.parameters() if p.requires_grad], grads):
                p.grad = grad.clone()
            for group in opt.param_groups:
                group["lr"] = lr
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)          # (float rounding)
