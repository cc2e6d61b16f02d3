"""runs.py: where runs and caches live, the newest run, atomic saves and the device."""
import os
import time

import pytest
import torch

import runs


def test_newest_run_is_the_last_checkpoint_written(tmp_path):
    with pytest.raises(SystemExit, match="no run with a checkpoint.pt"):
        runs.newest_run(str(tmp_path))
    for name in ("b", "a"):                          # "a" is written last, though it sorts first
        os.makedirs(tmp_path / name)
        runs.save_atomic({"step": 1}, str(tmp_path / name / "checkpoint.pt"))
        time.sleep(0.01)
    os.makedirs(tmp_path / "empty")                  # a run without a checkpoint is not a candidate
    assert runs.newest_run(str(tmp_path)) == str(tmp_path / "a")
    assert not any(f.endswith(".tmp") for f in os.listdir(tmp_path / "a"))


def test_cache_sits_beside_the_run_directories(tmp_path):
    assert runs.cache_dir(str(tmp_path / "runs" / "x")) == str(tmp_path / "runs" / ".cache")
    assert runs.cache_dir() == os.path.join("runs", ".cache")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_cuda_without_a_gpu_is_a_clear_error():
    assert runs.pick_device(None).type == "cpu"
    with pytest.raises(SystemExit, match="no CUDA GPU"):
        runs.pick_device("cuda")
