"""test.py: linear evaluation and kNN of a trained run, its command line, the 1% / 10% label subsets
and semi-supervised fine-tuning."""
import json
import os

import pytest
import torch

import test as evaluate
from tests.conftest import run


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


class _Pickled:
    """A pickle that would create `marker` when loaded without weights_only."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("content, message", [
    ("code", "refused to load"),
    (torch.zeros(3), "holds a Tensor, not an encoder"),
    ([1, 2], "holds a list, not an encoder"),
    ("nan", "NaN or Inf weights"),
    (b"PK\x03\x04 cut short", "cannot be read"),
])
def test_encoder_files_that_are_not_an_encoder_are_clear_errors(trained, tmp_path, content, message):
    """A pickle that would run code is refused and runs nothing; a tensor, a list, non-finite weights
    (a diverged run) and a truncated file each get their own message."""
    marker, path = tmp_path / "ran", tmp_path / "encoder.pt"
    if content == "code":
        torch.save({"conv1.weight": _Pickled(str(marker))}, path)
    elif content == "nan":
        state = torch.load(os.path.join(trained, "encoder.pt"), weights_only=True)
        state["layer1.0.conv1.weight"][0] = float("nan")
        torch.save(state, path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(SystemExit, match=message):
        evaluate.load_encoder(str(path))
    assert not marker.exists()


def test_bad_numbers_are_usage_errors(capsys):
    for flags in (["--k", "-1"], ["--subset", "0"], ["--epochs", "0"]):
        with pytest.raises(SystemExit) as e:
            evaluate.main(["anything", *flags])
        assert e.value.code == 2 and flags[0] in capsys.readouterr().err


def test_encoder_of_another_architecture_is_a_clear_error(trained, image_root):
    r = run("test.py", trained, "--arch", "resnet50", "--data", str(image_root), "--device", "cpu")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "resnet50" in r.stderr


@pytest.mark.parametrize("fraction, per_class", [(0.01, 3), (0.1, 30)])
def test_label_subset_is_class_balanced_and_fixed_by_seed(fraction, per_class):
    labels = torch.arange(10).repeat_interleave(300)[torch.randperm(3000)]
    labels[:50] = -1                                                       # unlabelled images never drawn
    keep = evaluate.balanced_subset(labels, fraction, seed=0)
    assert len(keep) == len(set(keep.tolist())) == 10 * per_class
    assert torch.bincount(labels[keep], minlength=10).tolist() == [per_class] * 10
    assert torch.equal(keep, evaluate.balanced_subset(labels, fraction, seed=0))
    assert not torch.equal(keep, evaluate.balanced_subset(labels, fraction, seed=1))


def test_semi_supervised_finetunes_a_copy_and_reports_top1_top5(image_root):
    r = evaluate.main(["--random-init", "--data", str(image_root), "--labels", "0.1", "--finetune-epochs", "2",
                       "--epochs", "1", "--device", "cpu"])
    assert r["labels"] == 0.1 and r["n_labels"] == 8                      # 2 of each of the 4 classes
    assert 0 <= r["semi_top1"] <= r["semi_top5"] <= 1


def test_published_figures_sit_beside_the_matching_figure_of_ours(tmp_path, capsys):
    """solo-learn's 92.58% is its online classifier: it is set beside train.py's online probe on the
    test split (the last one logged), lightly's kNN beside test.py's kNN, and the offline linear probe
    is said to have no published twin."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "log.jsonl").write_text(json.dumps(dict(epoch=5, probe_test_top1=0.5, knn_top1=0.4)) + "\n"
                                       + json.dumps(dict(epoch=10, probe_test_top1=0.75, knn_top1=0.6)) + "\n")
    evaluate.compare(dict(top1=0.7, knn_top1=0.65, n_train=10, n_test=5), str(run_dir))
    out = capsys.readouterr().out
    assert "10 epochs trained" in out
    online = next(line for line in out.splitlines() if "probe_test_top1" in line)
    assert "75.00%" in online and "92.58%" in online and "online" in online
    assert "65.00%" in next(line for line in out.splitlines() if "knn_top1" in line)
    assert "no published like-for-like" in next(line for line in out.splitlines() if "top1 " in line and "70.00%" in line)
