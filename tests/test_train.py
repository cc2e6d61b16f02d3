"""train.py: whole training runs as a user starts them: logs, checkpoints, the encoder, Ctrl-C and exact
resume, the host syncs of the loop, --minutes, --stream and the ImageNet recipe."""
import json
import multiprocessing
import os
import signal

import pytest
import torch
import torchvision

from machinery import data
import test as evaluate
from models import resnet
import train
from machinery.evaluation import features
from machinery.files import cache_dir
from tests.conftest import TINY, main_of


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
    was never stopped (same data order, same augmentations, same optimizer state). 2 epochs of 2 steps:
    stopped after step 3, inside the second epoch."""
    args = ["--data", str(image_root / "train"), "--subset", "16", "--epochs", "2", *TINY]
    straight = train.main([*args, "--out", str(tmp_path / "straight")])

    calls = []
    augment = train.Augment.__call__

    def interrupt_on_third_batch(self, x):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # as if the user pressed Ctrl-C during step 3
        return augment(self, x)
    monkeypatch.setattr(train.Augment, "__call__", interrupt_on_third_batch)
    with pytest.raises(SystemExit, match="Stopped by SIGINT at step 3/4"):
        train.main([*args, "--out", str(tmp_path / "stopped")])
    assert torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=False)["step"] == 3
    monkeypatch.setattr(train.Augment, "__call__", augment)
    train.main(["--resume", str(tmp_path / "stopped")])

    a = torch.load(os.path.join(straight, "checkpoint.pt"), weights_only=False)
    b = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=False)
    assert b["step"] == a["step"] == 4
    for part in ("online", "target", "predictor", "probe"):
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), f"{part}.{k} differs after resume"
    steps = [json.loads(line)["step"] for line in open(tmp_path / "stopped" / "log.jsonl")]
    assert steps == [2, 3, 4]


def test_batch_size_too_small_for_batchnorm(image_root):
    r = main_of("train.py", "--data", str(image_root / "train"), "--batch-size", "1", "--device", "cpu")
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
    r = main_of("test.py", out, "--stem", "cifar", "--data", str(image_root), "--device", "cpu")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "stem" in r.stderr


def test_no_host_sync_per_step(image_root, tmp_path, monkeypatch):
    """The loop reads tensors on the host only at logging intervals (and at the epoch's end): the same
    data as 2 steps of 16 and as 4 steps of 8, logged once, must read the same number of values. A
    .item(), float(t) or `if t:` added to every step would read 2 more in the second run."""
    for split in ("train", "test"):     # decoded into the user's cache first, as train.py's: both runs read it
        data.load(str(image_root), split=split, subset=32 if split == "train" else None, cache=cache_dir())
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
        train.main(["--data", str(image_root / "train"), "--subset", "32", "--epochs", "1", "--batch-size", str(batch),
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
    r = main_of("train.py", "--resume", budget, "--minutes", "1")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "--minutes" in r.stderr


def test_streaming_path_trains_and_resumes(image_root, tmp_path, monkeypatch):
    """--stream: DataLoader workers decode and crop each batch from disk; the run logs, saves, stops on
    Ctrl-C mid-epoch (step 3 of 2 epochs of 2 steps) and resumes there with the same data order."""
    args = ["--data", str(image_root / "train"), "--stream", "--subset", "16", "--epochs", "2", "--workers", "2",
            "--out", str(tmp_path / "run"), *TINY]
    calls, augment = [], train.Augment.__call__

    def interrupt_on_third_batch(self, x):
        calls.append(x)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return augment(self, x)
    monkeypatch.setattr(train.Augment, "__call__", interrupt_on_third_batch)
    with pytest.raises(SystemExit, match="Stopped by SIGINT at step 3/4"):
        train.main(args)
    assert all(isinstance(x, tuple) and x[0].shape == x[1].shape == (8, 3, 32, 32) for x in calls)
    assert not multiprocessing.active_children()                    # the stopped run's workers ended with it
    train.main(["--resume", str(tmp_path / "run")])
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 4
    assert [json.loads(line)["step"] for line in open(tmp_path / "run" / "log.jsonl")] == [2, 3, 4]
    assert len(calls) == 4                                          # step 4 alone after the resume


def test_a_set_too_large_for_memory_names_stream_before_decoding(image_root):
    r = main_of("train.py", "--data", str(image_root / "train"), "--image-size", "200000", *TINY)
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


def test_cuda_graph_flag_trains_the_same_weights_on_the_cpu(image_root, tmp_path):
    """--cuda-graph runs the loop's step through devices.StepGraph (on the CPU: eagerly, on its static
    buffers, with lr and tau as device tensors): the run ends on the very weights of the plain loop."""
    args = ["--data", str(image_root / "train"), "--subset", "16", "--epochs", "2", "--knn-every", "0", *TINY]
    plain = train.main([*args, "--out", str(tmp_path / "plain")])
    graphed = train.main([*args, "--cuda-graph", "--out", str(tmp_path / "graphed")])
    a, b = (torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True) for out in (plain, graphed))
    for part in ("online", "target", "predictor", "probe"):
        assert all(torch.equal(v, b[part][k]) for k, v in a[part].items()), part
    assert b["config"]["cuda_graph"] and not a["config"]["cuda_graph"]
    r = main_of("train.py", *args, "--cuda-graph", "--stream", "--out", str(tmp_path / "stream"))
    assert r.returncode != 0 and "--cuda-graph" in r.stderr             # a graph needs the batch in memory


@pytest.mark.parametrize("save_minutes, saved_at", [("0", [2, 4, 6]), ("1000", [6])])
def test_checkpoints_follow_save_minutes(image_root, tmp_path, monkeypatch, save_minutes, saved_at):
    """--save-minutes 0 saves every epoch; a long interval saves at the end only (and on a signal, which the
    SIGTERM tests cover): 3 epochs of 2 steps."""
    from machinery import runs
    saved, write = [], runs.Run.write
    monkeypatch.setattr(runs.Run, "write", lambda self, folder, step, *a: saved.append(step) or write(self, folder, step, *a))
    train.main(["--data", str(image_root / "train"), "--subset", "16", "--epochs", "3", "--knn-every", "0",
                "--out", str(tmp_path / "run"), *TINY, "--save-minutes", save_minutes])
    assert saved == saved_at
