"""monitors.py: the online probe (no gradient reaches the encoder, unlabelled images skipped), the
collapse monitor z_std and its warning, and what a log record holds."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from models import BYOL
import train
from machinery import monitors
from machinery.monitors import Monitor, collapse_warning, probe_update, z_std
from tests.conftest import small_byol


def test_probe_never_sends_gradients_into_the_encoder():
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8))
    probe = torch.nn.Linear(8, 3)
    opt = torch.optim.SGD(probe.parameters(), lr=0.1, momentum=0.9)
    y = encoder(torch.randn(6, 12))                                  # still attached to the encoder
    before = probe.weight.detach().clone()
    correct, labelled = probe_update(probe, opt, y, torch.tensor([0, 1, 2, -1, 0, -1]))
    assert all(p.grad is None for p in encoder.parameters()), "the probe's loss reached the encoder"
    assert not torch.equal(probe.weight, before) and labelled.item() == 4 and 0 <= correct.item() <= 4


def test_probe_step_leaves_byol_gradients_and_weights_unchanged():
    """byol_update then probe_update gives the encoder the same gradients and weights as byol_update alone."""
    def step(with_probe):
        torch.manual_seed(0)
        model = BYOL("resnet18", 32, hidden_dim=32, proj_dim=16).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        probe = torch.nn.Linear(512, 4)
        views = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)           # small images: a fast test
        _, y1, _ = train.byol_update(model, model, opt, *views, lr=0.1, tau=0.99)
        if with_probe:
            probe_update(probe, torch.optim.SGD(probe.parameters(), lr=0.1), y1, torch.tensor([0, 1, 2, 3]))
        return model.online.encoder
    a, b = step(False), step(True)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p.grad, q.grad) and torch.equal(p, q), name


def test_probe_ignores_unlabelled_images():
    torch.manual_seed(0)
    y, labels = torch.randn(8, 5), torch.tensor([0, 1, -1, -1, 1, 0, -1, 1])
    grads = []
    for y_, l_ in ((y, labels), (y[labels >= 0], labels[labels >= 0])):     # with and without the -1s
        probe = torch.nn.Linear(5, 2)
        torch.nn.init.constant_(probe.weight, 0.1)
        torch.nn.init.zeros_(probe.bias)
        probe_update(probe, torch.optim.SGD(probe.parameters(), lr=0.0), y_, l_)
        grads.append(probe.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])
    probe = torch.nn.Linear(5, 2)
    w = probe.weight.detach().clone()
    _, labelled = probe_update(probe, torch.optim.SGD(probe.parameters(), lr=0.1), y, torch.full((8,), -1))
    assert labelled.item() == 0 and torch.equal(probe.weight, w)          # nothing to learn, no NaN


def test_collapse_monitor_reads_zero_when_collapsed_and_one_over_sqrt_d_when_spread():
    torch.manual_seed(0)
    same = torch.randn(1, 256).expand(512, 256)
    assert z_std(same).item() == pytest.approx(0, abs=1e-6)
    spread = F.normalize(torch.randn(512, 256), dim=1)
    assert z_std(spread).item() == pytest.approx(1 / 16, rel=0.05)
    assert z_std(7 * spread).item() == pytest.approx(z_std(spread).item())  # of z / ||z||
    assert collapse_warning(0.05, 0.01, 256, 1, 5) is None
    warning = collapse_warning(0.002, 0.01, 256, 1, 5)
    assert all(flag in warning for flag in ("--tau-base", "--base-lr", "--no-predictor"))


def test_monitor_accumulates_on_device_and_reads_means(monkeypatch):
    """Loss and z_std are averaged over the log interval (z_std's max kept too), the probe's hits over
    the epoch, read at an epoch's end (steps_per_epoch 3) and reset after each read."""
    hits = iter([(3, 4), (1, 4), (0, 0)])
    monkeypatch.setattr(monitors, "probe_update", lambda *a: tuple(torch.tensor(h) for h in next(hits)))
    cfg = dict(batch_size=64, probe_lr=0.1, normalize="cifar10", knn_every=0, collapse_z_std=0.0, proj_dim=16)
    batches = SimpleNamespace(labels=torch.tensor([0, 1, 2, 3]), steps_per_epoch=3)
    m = Monitor(small_byol(), batches, None, cfg, torch.device("cpu"))
    collapsed, spread, y = torch.ones(64, 16), F.normalize(torch.randn(64, 16), dim=1), torch.randn(64, 512)
    m.add(torch.tensor(2.0), y, collapsed, None)
    m.add(torch.tensor(4.0), y, spread, None)
    r = m.read(2, total_steps=30)
    assert r["images_per_s"] > 0
    assert r["loss"] == pytest.approx(3.0) and r["z_std_max"] == pytest.approx(z_std(spread).item())
    assert r["z_std"] == pytest.approx(z_std(spread).item() / 2) and "probe_top1" not in r
    m.add(torch.tensor(1.0), y, spread, None)
    r = m.read(3, total_steps=30)
    assert r["loss"] == pytest.approx(1.0) and r["probe_top1"] == pytest.approx(4 / 8)   # over the epoch
    assert "knn_top1" not in r                                                             # no test split
