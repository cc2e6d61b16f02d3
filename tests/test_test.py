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
