"""Schedules, the EMA target, LARS and the networks."""
import math

import pytest
import torch
import torchvision

from models import BYOL, resnet
from train import LARS, lr_at, param_groups, tau_at


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


def small_byol(**kw):
    torch.manual_seed(0)
    return BYOL("resnet18", 32, hidden_dim=32, proj_dim=16, **kw)


def test_target_gets_no_gradient_and_moves_only_by_ema():
    model = small_byol()
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    before = [p.clone() for p in model.target.parameters()]
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    loss, y, z = model(x1, x2)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.target.parameters())
    assert all(p.grad is not None for p in model.predictor.parameters())
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.target.parameters())), \
        "the optimizer step changed the target"
    online = [p.detach().clone() for p in model.online.parameters()]
    dist = sum((a - b).norm() for a, b in zip(before, online))
    tau = 0.9
    model.update_target(tau)
    for old, new, theta in zip(before, model.target.parameters(), online):
        torch.testing.assert_close(new, tau * old + (1 - tau) * theta)
    assert sum((a - b).norm() for a, b in zip(model.target.parameters(), online)) < dist
    model.update_target(0.0)  # tau = 0: the target becomes the online network
    assert all(torch.equal(a, b) for a, b in zip(model.target.parameters(), model.online.parameters()))


@pytest.mark.parametrize("joint", [False, True])
def test_forward_shapes_and_views_are_not_mixed_up(joint):
    model = small_byol(joint_views=joint).train()
    loss, y, z = model(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))
    assert loss.ndim == 0 and 0 <= loss.item() <= 8
    assert y.shape == (4, 512) and z.shape == (4, 16) and not y.requires_grad


def test_no_predictor_ablation_has_no_predictor_parameters():
    assert not list(small_byol(predictor=False).predictor.parameters())


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


def test_lars_step_matches_formula():
    w = torch.nn.Parameter(torch.randn(8, 4))
    b = torch.nn.Parameter(torch.randn(8))
    w.grad, b.grad = torch.randn(8, 4), torch.randn(8)
    w0, b0, gw, gb = w.detach().clone(), b.detach().clone(), w.grad.clone(), b.grad.clone()
    opt = LARS([dict(params=[w], weight_decay=0.1, lars=True), dict(params=[b], weight_decay=0.0, lars=False)],
               lr=0.5, momentum=0.9, eta=0.02)
    opt.step()
    u = gw + 0.1 * w0
    trust = 0.02 * w0.norm() / u.norm()
    torch.testing.assert_close(w.detach(), w0 - 0.5 * trust * u)
    torch.testing.assert_close(b.detach(), b0 - 0.5 * gb)  # excluded: no decay, no trust ratio
    w1, gw2 = w.detach().clone(), torch.randn(8, 4)
    b.grad, w.grad = gb.clone(), gw2.clone()
    opt.step()  # momentum: v = 0.9 * gb + gb; v = 0.9 * trust u + trust2 u2 with the new trust ratio
    torch.testing.assert_close(b.detach(), b0 - 0.5 * gb - 0.5 * 1.9 * gb)
    u2 = gw2 + 0.1 * w1
    torch.testing.assert_close(w.detach(), w1 - 0.5 * (0.9 * trust * u + 0.02 * w1.norm() / u2.norm() * u2))


def test_encoder_is_a_plain_torchvision_resnet():
    encoder, dim = resnet("resnet18", 32)
    net = torchvision.models.resnet18()
    net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool = torch.nn.Identity()
    net.fc = torch.nn.Identity()
    net.load_state_dict(encoder.state_dict(), strict=True)
    assert dim == 512 and net(torch.randn(2, 3, 32, 32)).shape == (2, 512)
    assert resnet("resnet18", 96)[0].conv1.kernel_size == (7, 7)  # ImageNet stem above 64 px


def test_imagenet_stem_at_32px_is_plain_torchvision_resnet18():
    """--stem imagenet (the CPU proxy): a 32 px image goes through torchvision's own 7x7/2 conv and
    max-pool, so the encoder loads strictly into resnet18() with only fc replaced."""
    encoder, dim = resnet("resnet18", 32, stem="imagenet")
    net = torchvision.models.resnet18()
    net.fc = torch.nn.Identity()
    net.load_state_dict(encoder.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    net.eval(), encoder.eval()
    torch.testing.assert_close(encoder(x), net(x))
    assert isinstance(encoder.maxpool, torch.nn.MaxPool2d) and encoder.conv1.stride == (2, 2)
    with pytest.raises(ValueError, match="stem"):
        resnet("resnet18", 32, stem="tiny")
