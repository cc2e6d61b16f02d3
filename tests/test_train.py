"""train.py: the schedules, LARS, the online probe and the monitors, and whole training runs (logs,
checkpoints, Ctrl-C and resume, the host syncs of the loop)."""
import json
import math
import os
import signal

import pytest
import torch
import torch.nn.functional as F
import torchvision

import data
import test as evaluate
import train
from evaluation import features
from models import BYOL, resnet
from tests.conftest import ROOT, TINY, run, small_byol
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


def test_tau_ablation_settings():
    assert all(train.tau_at(k, 100, 1.0) == 1.0 for k in range(101))       # target stays random
    assert all(train.tau_at(k, 100, 0.0, "constant") == 0.0 for k in range(101))  # target = online
    assert train.tau_at(50, 100, 0.0) == pytest.approx(0.5)                # the cosine would not be


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
    """One LARS step, tensor by tensor, from the formulas (solo-learn's clipped form, or the paper's)."""
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
    """The clipped and the paper's LARS are not the same rule: one step at lr 0.1 on a tensor with a
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


def test_train_writes_checkpoint_encoder_and_log(trained):
    assert {"checkpoint.pt", "encoder.pt", "log.jsonl", "config.json"} <= set(os.listdir(trained))
    log = [json.loads(line) for line in open(os.path.join(trained, "log.jsonl"))]
    assert [r["step"] for r in log] == [2, 4, 6, 8]
    assert {"epoch", "step", "loss", "lr", "tau", "images_per_s", "z_std"} <= log[0].keys()
    assert "probe_top1" in log[1] and "knn_top1" in log[-1]      # every epoch; at the end
    assert all(0 <= r["loss"] <= 8 for r in log) and log[-1]["tau"] > log[0]["tau"]
    ckpt = torch.load(os.path.join(trained, "checkpoint.pt"), weights_only=False)
    assert ckpt["step"] == 8 and ckpt["epoch"] == 2 and ckpt["config"]["batch_size"] == 8
    # The README's recipe for taking the encoder elsewhere.
    net = torchvision.models.resnet18()
    net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool, net.fc = torch.nn.Identity(), torch.nn.Identity()
    net.load_state_dict(torch.load(os.path.join(trained, "encoder.pt")), strict=True)
    online = {k[len("encoder."):]: v for k, v in ckpt["online"].items() if k.startswith("encoder.")}
    assert all(torch.equal(v, online[k]) for k, v in net.state_dict().items())


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


def test_interrupt_then_resume_continues_exactly(image_root, tmp_path, monkeypatch):
    """Ctrl-C mid-epoch saves a checkpoint; --resume then ends on the same weights as a run that
    was never stopped (same data order, same augmentations, same optimizer state)."""
    args = ["--data", str(image_root / "train"), "--subset", "32", "--epochs", "2", *TINY]
    straight = train.main([*args, "--out", str(tmp_path / "straight")])

    calls = []
    augment = train.Augment.__call__

    def interrupt_on_third_batch(self, x):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # as if the user pressed Ctrl-C during step 3
        return augment(self, x)
    monkeypatch.setattr(train.Augment, "__call__", interrupt_on_third_batch)
    with pytest.raises(SystemExit, match="Stopped by SIGINT at step 3/8"):
        train.main([*args, "--out", str(tmp_path / "stopped")])
    assert torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=False)["step"] == 3
    monkeypatch.setattr(train.Augment, "__call__", augment)
    train.main(["--resume", str(tmp_path / "stopped")])

    a = torch.load(os.path.join(straight, "checkpoint.pt"), weights_only=False)
    b = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=False)
    assert b["step"] == a["step"] == 8
    for part in ("online", "target", "predictor", "probe"):
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), f"{part}.{k} differs after resume"
    steps = [json.loads(line)["step"] for line in open(tmp_path / "stopped" / "log.jsonl")]
    assert steps == [2, 3, 4, 6, 8]


def test_batch_size_too_small_for_batchnorm(image_root):
    r = run("train.py", "--data", str(image_root / "train"), "--batch-size", "1", "--device", "cpu")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "BatchNorm" in r.stderr


def test_imagenet_stem_run_trains_saves_and_evaluates(image_root, tmp_path):
    """--stem imagenet goes into config.json; encoder.pt loads into a plain torchvision resnet18, and
    test.py rebuilds the same stem from the run (a CIFAR-stem encoder would not load), and refuses
    --stem cifar with a clear error."""
    out = str(tmp_path / "proxy")
    train.main(["--data", str(image_root / "train"), "--subset", "16", "--epochs", "1", "--stem", "imagenet",
                "--knn-every", "0", "--out", out, *TINY])
    assert json.load(open(os.path.join(out, "config.json")))["stem"] == "imagenet"
    net = torchvision.models.resnet18()
    net.fc = torch.nn.Identity()
    net.load_state_dict(torch.load(os.path.join(out, "encoder.pt")), strict=True)
    result = evaluate.main([out, "--data", str(image_root), "--epochs", "1", "--device", "cpu"])
    assert 0 <= result["knn_top1"] <= 1
    r = run("test.py", out, "--stem", "cifar", "--data", str(image_root), "--device", "cpu")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "stem" in r.stderr


def test_no_host_sync_per_step(image_root, tmp_path, monkeypatch):
    """The loop reads tensors on the host only at logging intervals (and at the epoch's end): the same
    data as 3 steps of 16 and as 6 steps of 8, logged once, must read the same number of values. A
    .item(), float(t) or `if t:` added to every step would read 3 more in the second run."""
    reads = []
    for name in ("item", "tolist", "numpy", "cpu", "nonzero", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            reads.append(1)
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    counts = []
    for batch in (16, 8):
        reads.clear()
        train.main(["--data", str(image_root / "train"), "--subset", "48", "--epochs", "1", "--batch-size", str(batch),
                    "--hidden-dim", "32", "--proj-dim", "16", "--log-every", "100", "--device", "cpu",
                    "--out", str(tmp_path / f"b{batch}")])
        counts.append(len(reads))
    assert counts[0] == counts[1] and counts[0] > 0  # > 0: the counter saw the logging's reads


def test_online_probe_is_scored_on_the_test_split_beside_knn(trained, image_root, tmp_path):
    """probe_test_top1 (solo-learn's "Acc@1 (online)") is the final probe on eval-mode features of the
    test images: recomputed here from the checkpoint, it must match the logged figure."""
    last = [json.loads(line) for line in open(os.path.join(trained, "log.jsonl"))][-1]
    assert {"knn_top1", "probe_test_top1"} <= last.keys()
    ckpt = torch.load(os.path.join(trained, "checkpoint.pt"), weights_only=False)
    encoder = resnet("resnet18", 32)[0]
    encoder.load_state_dict({k[len("encoder."):]: v for k, v in ckpt["online"].items() if k.startswith("encoder.")})
    probe = torch.nn.Linear(512, 4)
    probe.load_state_dict(ckpt["probe"])
    x, y = data.load(str(image_root), split="test", cache=str(tmp_path))
    with torch.no_grad():
        accuracy = (probe(features(encoder, x, torch.device("cpu"))).argmax(1) == y).float().mean().item()
    assert last["probe_test_top1"] == pytest.approx(accuracy)


def test_fit_epochs_fills_the_budget_with_checks_and_checkpoints():
    # 10 steps of 1 s per epoch: 6 epochs in a minute
    assert train.fit_epochs(1, 10, 0, 1.0, 0.0, 0.0) == (6, 60.0)
    # a 5 s check every 2 epochs and at the end, a 1 s checkpoint per epoch: 4 epochs = 44 + 2 checks
    assert train.fit_epochs(1, 10, 2, 1.0, 5.0, 1.0) == (4, 54.0)
    assert train.fit_epochs(1, 10, 2, 1.0, 5.0, 1.0)[0] < train.fit_epochs(2, 10, 2, 1.0, 5.0, 1.0)[0]
    assert train.fit_epochs(0.001, 10, 0, 1.0, 0.0, 0.0)[0] == 1  # never less than one epoch


def test_minutes_plans_a_whole_schedule_and_leaves_no_trace(image_root, tmp_path):
    """--minutes times a few steps on the real model, then runs a complete schedule (the lr warm-up
    and cosine, and tau, end at the planned last step) and records planned and real time. The trial
    leaves no trace: the same number of --epochs gives the very same weights."""
    args = ["--data", str(image_root / "train"), "--subset", "32", *TINY]
    budget = train.main([*args, "--minutes", "0.05", "--knn-every", "1", "--out", str(tmp_path / "budget")])
    cfg = json.load(open(os.path.join(budget, "config.json")))
    assert cfg["epochs"] >= 1 and cfg["planned_minutes"] > 0 and cfg["train_minutes"] > 0
    ckpt = torch.load(os.path.join(budget, "checkpoint.pt"), weights_only=False)
    assert ckpt["step"] == cfg["epochs"] * 4                                   # 32 images, batch 8
    last = [json.loads(line) for line in open(os.path.join(budget, "log.jsonl"))][-1]
    assert last["step"] == ckpt["step"] and last["minutes"] > 0
    same = train.main([*args, "--epochs", str(cfg["epochs"]), "--knn-every", "1", "--out", str(tmp_path / "epochs")])
    other = torch.load(os.path.join(same, "checkpoint.pt"), weights_only=False)
    for part in ("online", "target", "predictor", "probe"):
        assert all(torch.equal(v, other[part][k]) for k, v in ckpt[part].items()), part
    r = run("train.py", "--resume", budget, "--minutes", "1")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "--minutes" in r.stderr


# ---- Reliability: nothing good is overwritten, preemption and mistakes lose nothing (issue 11) ----

def _copy_run(trained, tmp_path, name="run"):
    """A copy of the finished tiny run to change, with the decoded-data cache that sits beside it."""
    import shutil
    cache = os.path.join(os.path.dirname(trained), ".cache")
    if os.path.isdir(cache) and not (tmp_path / ".cache").exists():
        shutil.copytree(cache, tmp_path / ".cache")
    return shutil.copytree(trained, tmp_path / name, ignore=shutil.ignore_patterns("lock"))


class _Pickled:
    """A pickle that would create `marker` when loaded without weights_only."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_that_would_run_code_is_refused(trained, tmp_path):
    run_dir, marker = _copy_run(trained, tmp_path), tmp_path / "ran"
    torch.save({"config": {}, "payload": _Pickled(str(marker))}, run_dir / "checkpoint.pt")
    r = run("train.py", "--resume", str(run_dir))
    assert r.returncode != 0 and "Traceback" not in r.stderr and "refused" in r.stderr
    assert not marker.exists()


def _diverge_after(step):
    """lr_at as it is, then an lr of 1e12 from `step` on: the run diverges there."""
    lr_at = train.lr_at
    return lambda k, *a: 1e12 if k >= step else lr_at(k, *a)


def test_a_diverging_run_stops_and_keeps_its_last_good_checkpoint(image_root, tmp_path, monkeypatch):
    """The loss turns NaN in epoch 2: the run stops with a message naming the steps and the cause, exits
    non-zero, and the checkpoint and encoder of epoch 1 stay as they were, finite."""
    out = tmp_path / "run"
    monkeypatch.setattr(train, "lr_at", _diverge_after(4))
    with pytest.raises(SystemExit, match=r"diverged.*between steps 5 and \d+.*lower --base-lr.*of step 4") as e:
        train.main(["--data", str(image_root / "train"), "--subset", "32", "--epochs", "3",
                    "--optimizer", "sgd", "--out", str(out), *TINY])
    assert e.value.code != 0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 4 and all(v.isfinite().all() for v in ckpt["online"].values() if v.is_floating_point())
    encoder = torch.load(out / "encoder.pt", weights_only=True)
    assert all(torch.equal(v, ckpt["online"]["encoder." + k]) for k, v in encoder.items())
    assert all(math.isfinite(json.loads(line)["loss"]) for line in open(out / "log.jsonl"))


def test_a_second_writer_is_refused_and_a_dead_one_holds_no_lock(trained, tmp_path):
    import subprocess
    import sys
    run_dir = _copy_run(trained, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", f"import runs, time; f = runs.lock({str(run_dir)!r}); "
                               f"print('locked', flush=True); time.sleep(120)"], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "locked"
    r = run("train.py", "--resume", str(run_dir), "--epochs", "3")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "in use" in r.stderr
    holder.kill()                                               # kill -9: the OS frees the lock
    holder.wait()
    import runs
    runs.lock(str(run_dir)).close()


def test_a_new_run_is_refused_in_a_folder_that_holds_one(trained):
    before = os.path.getmtime(os.path.join(trained, "checkpoint.pt"))
    r = run("train.py", "--data", "anything", "--out", trained, "--device", "cpu")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "--resume" in r.stderr
    assert os.path.getmtime(os.path.join(trained, "checkpoint.pt")) == before


def test_resume_after_a_kill_drops_repeated_log_lines_stale_files_and_an_old_encoder(trained, tmp_path,
                                                                                     monkeypatch):
    """What kill -9 leaves: log lines past the checkpoint, a half-written .tmp, a time-trial folder, and
    an encoder.pt older than the checkpoint. The resumed run cleans each up before its first step."""
    run_dir = _copy_run(trained, tmp_path)
    with open(run_dir / "log.jsonl", "a") as f:
        f.write(json.dumps(dict(step=9, loss=1.0)) + "\n" + '{"step": 10, "lo')
    (run_dir / "checkpoint.pt.tmp").write_bytes(b"half")
    os.makedirs(run_dir / "time-trial-abc")
    torch.save({k: torch.zeros_like(v) for k, v in torch.load(run_dir / "encoder.pt").items()}, run_dir / "encoder.pt")

    def crash(self, x):
        raise RuntimeError("crashed in the first step")
    monkeypatch.setattr(train.Augment, "__call__", crash)
    with pytest.raises(RuntimeError, match="crashed"):
        train.main(["--resume", str(run_dir), "--epochs", "3"])
    assert [json.loads(line)["step"] for line in open(run_dir / "log.jsonl")] == [2, 4, 6, 8]
    assert not (run_dir / "checkpoint.pt.tmp").exists() and not (run_dir / "time-trial-abc").exists()
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    encoder = torch.load(run_dir / "encoder.pt", weights_only=True)
    assert all(torch.equal(v, ckpt["online"]["encoder." + k]) for k, v in encoder.items())


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "4"], "--batch-size 4"),
    (["--hidden-dim", "64"], "--hidden-dim 64"),
    (["--epochs", "2"], "--epochs 2 ends where the run already is"),
])
def test_resume_refuses_what_would_change_the_saved_state(trained, flags, message):
    with pytest.raises(SystemExit, match=message):
        train.main(["--resume", trained, *flags])


def test_resuming_a_finished_run_does_nothing_and_says_so(trained, capsys):
    before = {f: os.path.getmtime(os.path.join(trained, f)) for f in os.listdir(trained)}
    with pytest.raises(SystemExit) as e:
        train.main(["--resume", trained])
    assert e.value.code == 0
    said = capsys.readouterr().out
    assert "Nothing to do" in said and "Done" not in said and "--epochs" in said
    assert {f: os.path.getmtime(os.path.join(trained, f)) for f in os.listdir(trained)} == before


@pytest.mark.parametrize("signals, message, saved", [
    ([signal.SIGTERM], "Stopped by SIGTERM at step 3/8", True),
    ([signal.SIGINT, signal.SIGINT], "second SIGINT: no checkpoint had been saved yet", False),
])
def test_sigterm_saves_like_ctrl_c_and_a_second_signal_says_what_is_kept(image_root, tmp_path, monkeypatch,
                                                                         signals, message, saved):
    calls, augment = [], train.Augment.__call__

    def signal_on_third_batch(self, x):
        calls.append(1)
        if len(calls) == 3:
            for s in signals:
                os.kill(os.getpid(), s)
        return augment(self, x)
    monkeypatch.setattr(train.Augment, "__call__", signal_on_third_batch)
    out = tmp_path / "run with spaces"
    with pytest.raises(SystemExit, match=message) as e:
        train.main(["--data", str(image_root / "train"), "--subset", "32", "--epochs", "2", "--out", str(out),
                    *TINY])
    assert (out / "checkpoint.pt").exists() == saved
    if saved:                                            # the printed command works as typed, spaces and all
        import shlex
        assert shlex.split(str(e.value.code).split("Continue with: ")[1]) == ["python", "train.py", "--resume",
                                                                              str(out)]
        assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(trained, tmp_path, monkeypatch):
    """Writes fail as on a full disk (a real ENOSPC, from /dev/full) once a few bytes are down."""
    run_dir = _copy_run(trained, tmp_path)
    before = {f: (run_dir / f).read_bytes() for f in ("checkpoint.pt", "encoder.pt")}

    def save_to_full_disk(obj, f):
        f.write(b"partial")
        with open("/dev/full", "wb") as full:
            full.write(b"\0" * (1 << 16))
    monkeypatch.setattr(torch, "save", save_to_full_disk)
    with pytest.raises(train.SaveError, match="disk holding .* is full.*partial file is removed.*is kept"):
        train.main(["--resume", str(run_dir), "--epochs", "3"])
    assert {f: (run_dir / f).read_bytes() for f in before} == before
    assert not [f for f in os.listdir(run_dir) if f.endswith(".tmp")]


@pytest.mark.parametrize("flags", [["--subset", "0"], ["--subset", "-5"], ["--epochs", "0"], ["--epochs", "-1"],
                                   ["--image-size", "0"], ["--batch-size", "1"], ["--minutes", "0"]])
def test_bad_numbers_are_usage_errors(flags, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--data", "anything", *flags])
    assert e.value.code == 2 and flags[0] in capsys.readouterr().err


def test_an_out_that_is_a_file_or_read_only_is_refused_before_any_work(image_root, tmp_path):
    (tmp_path / "file").write_text("")
    r = run("train.py", "--data", str(image_root / "train"), "--out", str(tmp_path / "file"), *TINY)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "is a file" in r.stderr
    # sysfs takes no new files, not even from root: an unwritable folder on any Linux machine
    r = run("train.py", "--data", str(image_root / "train"), "--out", "/sys/byol-run", *TINY)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "not writable" in r.stderr, r.stderr


@pytest.mark.parametrize("drop", ["perm", "rng"])
def test_a_checkpoint_missing_its_data_order_or_rng_is_named(trained, tmp_path, drop):
    run_dir = _copy_run(trained, tmp_path)
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    del ckpt[drop]
    torch.save(ckpt, run_dir / "checkpoint.pt")
    with pytest.raises(SystemExit, match=f"not a checkpoint written by train.py: it lacks {drop}"):
        train.main(["--resume", str(run_dir), "--epochs", "3"])


def test_streaming_path_trains_and_resumes(image_root, tmp_path, monkeypatch):
    """--stream: DataLoader workers decode and crop each batch from disk; the run logs, saves, stops on
    Ctrl-C mid-epoch and resumes there with the same data order."""
    args = ["--data", str(image_root / "train"), "--stream", "--subset", "32", "--epochs", "2", "--workers", "2",
            "--out", str(tmp_path / "run"), *TINY]
    calls, augment = [], train.Augment.__call__

    def interrupt_on_third_batch(self, x):
        calls.append(x)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return augment(self, x)
    monkeypatch.setattr(train.Augment, "__call__", interrupt_on_third_batch)
    with pytest.raises(SystemExit, match="Stopped by SIGINT at step 3/8"):
        train.main(args)
    assert all(isinstance(x, tuple) and x[0].shape == x[1].shape == (8, 3, 32, 32) for x in calls)
    train.main(["--resume", str(tmp_path / "run")])
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 8
    assert [json.loads(line)["step"] for line in open(tmp_path / "run" / "log.jsonl")] == [2, 3, 4, 6, 8]
    assert len(calls) == 8                                          # steps 4 to 8 after the resume


def test_a_set_too_large_for_memory_names_stream_before_decoding(image_root):
    r = run("train.py", "--data", str(image_root / "train"), "--image-size", "200000", *TINY)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "--stream" in r.stderr


def test_imagenet_recipe_streams_normalises_and_evaluates_as_imagenet(image_root, tmp_path):
    """--recipe imagenet at toy size: the paper's values in the saved config (what a flag does not
    override), the streaming path, blur, ImageNet's mean and std in training and in test.py."""
    out = train.main(["--recipe", "imagenet", "--arch", "resnet18", "--image-size", "64", "--subset", "16",
                      "--epochs", "1", "--workers", "0", "--data", str(image_root / "train"), "--out",
                      str(tmp_path / "run"), *TINY])
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert (cfg["recipe"], cfg["normalize"], cfg["stream"], cfg["blur"], cfg["lars_clip"]) == \
        ("imagenet", "imagenet", True, True, False)
    assert (cfg["base_lr"], cfg["weight_decay"], cfg["eta"], cfg["tau_base"]) == (0.2, 1.5e-6, 1e-3, 0.996)
    assert cfg["batch_size"] == 8 and cfg["arch"] == "resnet18"                   # the flags won
    import augment
    seen = []
    features = evaluate.features
    evaluate.features = lambda *a, **k: seen.append(k.get("stats")) or features(*a, **k)
    try:
        evaluate.main([out, "--data", str(image_root), "--epochs", "1", "--device", "cpu"])
    finally:
        evaluate.features = features
    assert seen and all(s == augment.STATS["imagenet"] for s in seen)
