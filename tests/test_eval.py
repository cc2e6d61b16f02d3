"""The monitors and evaluation protocols: kNN, the online probe, the collapse monitor, the 1% subset,
the fine-tuning protocol and the training curves."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import evaluation
import test as evaluate
import train
from models import BYOL
from tests.test_e2e import TINY


def test_knn_on_clusters_is_exact_and_uses_cosine_similarity():
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(4, 16, generator=g), dim=1)               # 4 classes
    train_y, test_y = torch.arange(4).repeat(25), torch.arange(4).repeat_interleave(5)
    train_f = centres[train_y] + 0.05 * torch.randn(100, 16, generator=g)
    test_f = centres[test_y] + 0.05 * torch.randn(20, 16, generator=g)
    assert evaluation.knn_accuracy(train_f, train_y, test_f, test_y, k=10, chunk=3) == 1.0
    # cosine similarity: the length of a feature does not matter
    assert evaluation.knn_accuracy(train_f, train_y, 100 * test_f, test_y, k=10) == 1.0
    assert evaluation.knn_accuracy(train_f, train_y, test_f, (test_y + 1) % 4, k=10) == 0.0


def test_knn_votes_are_weighted_by_similarity():
    # three far neighbours of class 0 (cos 0.5) against one identical neighbour of class 1:
    # a plain majority says 0; weights exp(sim / 0.1) give e^10 against 3 e^5, so 1
    query = torch.tensor([[1.0, 0.0]])
    far = torch.tensor([[0.5, math.sqrt(0.75)], [0.5, -math.sqrt(0.75)], [0.5, math.sqrt(0.75)]])
    train_f, train_y = torch.cat([far, query]), torch.tensor([0, 0, 0, 1])
    assert evaluation.knn_accuracy(train_f, train_y, query, torch.tensor([1]), k=4, t=0.1) == 1.0
    assert evaluation.knn_accuracy(train_f, train_y, query, torch.tensor([0]), k=4, t=100.0) == 1.0


def test_probe_never_sends_gradients_into_the_encoder():
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8))
    probe = torch.nn.Linear(8, 3)
    opt = torch.optim.SGD(probe.parameters(), lr=0.1, momentum=0.9)
    y = encoder(torch.randn(6, 12))                                  # still attached to the encoder
    before = probe.weight.detach().clone()
    correct, labelled = train.probe_update(probe, opt, y, torch.tensor([0, 1, 2, -1, 0, -1]))
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
            train.probe_update(probe, torch.optim.SGD(probe.parameters(), lr=0.1), y1, torch.tensor([0, 1, 2, 3]))
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
        train.probe_update(probe, torch.optim.SGD(probe.parameters(), lr=0.0), y_, l_)
        grads.append(probe.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])
    probe = torch.nn.Linear(5, 2)
    w = probe.weight.detach().clone()
    _, labelled = train.probe_update(probe, torch.optim.SGD(probe.parameters(), lr=0.1), y, torch.full((8,), -1))
    assert labelled.item() == 0 and torch.equal(probe.weight, w)          # nothing to learn, no NaN


def test_collapse_monitor_reads_zero_when_collapsed_and_one_over_sqrt_d_when_spread():
    torch.manual_seed(0)
    same = torch.randn(1, 256).expand(512, 256)
    assert train.z_std(same).item() == pytest.approx(0, abs=1e-6)
    spread = F.normalize(torch.randn(512, 256), dim=1)
    assert train.z_std(spread).item() == pytest.approx(1 / 16, rel=0.05)
    assert train.z_std(7 * spread).item() == pytest.approx(train.z_std(spread).item())  # of z / ||z||
    assert train.collapse_warning(0.05, 0.01, 256, 1, 5) is None
    warning = train.collapse_warning(0.002, 0.01, 256, 1, 5)
    assert all(flag in warning for flag in ("--tau-base", "--base-lr", "--no-predictor"))


def test_monitor_accumulates_on_device_and_reads_means():
    m = train.Monitor(torch.device("cpu"), batch_size=64)
    collapsed, spread = torch.ones(64, 16), F.normalize(torch.randn(64, 16), dim=1)
    m.add(torch.tensor(2.0), collapsed, (torch.tensor(3), torch.tensor(4)))
    m.add(torch.tensor(4.0), spread, (torch.tensor(1), torch.tensor(4)))
    steps, r = m.read(end_of_epoch=False)
    assert steps == 2 and r["images_per_s"] > 0
    assert r["loss"] == pytest.approx(3.0) and r["z_std_max"] == pytest.approx(train.z_std(spread).item())
    assert r["z_std"] == pytest.approx(train.z_std(spread).item() / 2) and "probe_top1" not in r
    m.add(torch.tensor(1.0), spread, (torch.tensor(0), torch.tensor(0)))
    steps, r = m.read(end_of_epoch=True)
    assert steps == 1 and r["loss"] == pytest.approx(1.0) and r["probe_top1"] == pytest.approx(4 / 8)   # over the epoch


def test_tau_ablation_settings():
    assert all(train.tau_at(k, 100, 1.0) == 1.0 for k in range(101))       # target stays random
    assert all(train.tau_at(k, 100, 0.0, "constant") == 0.0 for k in range(101))  # target = online
    assert train.tau_at(50, 100, 0.0) == pytest.approx(0.5)                # the cosine would not be


@pytest.mark.parametrize("fraction, per_class", [(0.01, 3), (0.1, 30)])
def test_label_subset_is_class_balanced_and_fixed_by_seed(fraction, per_class):
    labels = torch.arange(10).repeat_interleave(300)[torch.randperm(3000)]
    labels[:50] = -1                                                       # unlabelled images never drawn
    keep = evaluate.balanced_subset(labels, fraction, seed=0)
    assert len(keep) == len(set(keep.tolist())) == 10 * per_class
    assert torch.bincount(labels[keep], minlength=10).tolist() == [per_class] * 10
    assert torch.equal(keep, evaluate.balanced_subset(labels, fraction, seed=0))
    assert not torch.equal(keep, evaluate.balanced_subset(labels, fraction, seed=1))


def _log(path):
    os.makedirs(path, exist_ok=True)
    lines = [dict(epoch=0.5, step=1, loss=3.0, lr=0.1, tau=0.99, z_std=0.06),
             dict(epoch=1.0, step=2, loss=2.5, lr=0.2, tau=0.995, z_std=0.05, probe_top1=0.3, knn_top1=0.25),
             dict(epoch=2.0, step=4, loss=2.0, lr=0.0, tau=1.0, z_std=0.002, probe_top1=0.4)]
    with open(os.path.join(path, "log.jsonl"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in lines) + '{"epoch": 2.5, "lo')   # a line cut short
    return path


def test_plot_writes_a_png_from_a_log_with_missing_keys(tmp_path, monkeypatch):
    out = evaluate.plot_curves(_log(str(tmp_path / "run")), out=str(tmp_path / "a" / "curves.png"))
    assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    monkeypatch.chdir(tmp_path)                                            # the CLI writes README.assets/
    evaluate.main(["--plot", "run"])
    assert (tmp_path / "README.assets" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="no log"):
        evaluate.plot_curves(str(tmp_path / "nowhere"))


def test_training_logs_the_monitors_and_warns_once_on_collapse(image_root, tmp_path, capsys):
    """A tiny run (2 epochs of 2 steps) whose collapse threshold no z_std can reach: the warning is
    printed once, not at every log line; the log holds every monitor."""
    out = train.main(["--data", str(image_root / "train"), "--subset", "16", "--epochs", "2",
                      "--collapse-z-std", "1", "--out", str(tmp_path / "run"), *TINY])
    assert capsys.readouterr().out.count("the representation is collapsing") == 1
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [r["step"] for r in log] == [2, 4] and all(0 < r["z_std"] <= r["z_std_max"] < 1 for r in log)
    assert all(0 <= r["probe_top1"] <= 1 for r in log) and 0 <= log[-1]["knn_top1"] <= 1
    assert "knn_top1" not in log[0]                                       # --knn-every 10: at the end only


def test_semi_supervised_finetunes_a_copy_and_reports_top1_top5(image_root):
    r = evaluate.main(["--random-init", "--data", str(image_root), "--labels", "0.1", "--finetune-epochs", "2",
                       "--epochs", "1", "--device", "cpu"])
    assert r["labels"] == 0.1 and r["n_labels"] == 8                      # 2 of each of the 4 classes
    assert 0 <= r["semi_top1"] <= r["semi_top5"] <= 1
