"""train.py and test.py end to end on a tiny real subset, and the user mistakes they must catch."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import torchvision

import test as evaluate
import train
from tests.conftest import ROOT

TINY = ["--batch-size", "8", "--hidden-dim", "32", "--proj-dim", "16", "--log-every", "2", "--device", "cpu"]


def run(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained(image_root, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runs") / "tiny")
    train.main(["--data", str(image_root / "train"), "--subset", "32", "--epochs", "2", "--out", out, *TINY])
    return out


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


def test_evaluate_run(trained, image_root):
    result = evaluate.main([trained, "--data", str(image_root), "--epochs", "5", "--device", "cpu"])
    assert set(result) >= {"top1", "top5", "knn_top1"}
    assert result["n_train"] == 64 and result["n_test"] == 32
    assert 0 <= result["top1"] <= result["top5"] <= 1 and 0 <= result["knn_top1"] <= 1
    assert json.load(open(os.path.join(trained, "eval.json")))["top1"] == result["top1"]


def test_evaluate_cli_prints_json_last(trained, image_root):
    r = run("test.py", os.path.join(trained, "checkpoint.pt"), "--data", str(image_root), "--epochs", "2",
            "--augment", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["augment"] is True


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
    with pytest.raises(SystemExit, match="Interrupted at step 3/8"):
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


def test_missing_data_folder_is_a_clear_error(tmp_path):
    r = run("train.py", "--data", str(tmp_path / "nowhere"), "--device", "cpu")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "does not exist" in r.stderr and "--data" in r.stderr


def test_empty_class_folders_are_a_clear_error(tmp_path):
    os.makedirs(tmp_path / "cat")
    r = run("train.py", "--data", str(tmp_path), "--device", "cpu")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "No images" in r.stderr


def test_corrupt_image_is_a_clear_error(image_root, tmp_path):
    import shutil
    shutil.copytree(image_root / "train", tmp_path / "train")
    bad = tmp_path / "train" / "cat" / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    r = run("train.py", "--data", str(tmp_path / "train"), "--device", "cpu", "--epochs", "1")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "broken.jpg" in r.stderr


def test_batch_size_too_small_for_batchnorm(image_root):
    r = run("train.py", "--data", str(image_root / "train"), "--batch-size", "1", "--device", "cpu")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "BatchNorm" in r.stderr


def test_encoder_of_another_architecture_is_a_clear_error(trained, image_root):
    r = run("test.py", trained, "--arch", "resnet50", "--data", str(image_root), "--device", "cpu")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "resnet50" in r.stderr


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
