"""runs.py and files.py: where runs and caches live, atomic saves, and what survives what: code in a
pickle, divergence, a second writer, kill -9, signals, a full disk, bad flags and bad folders."""
import json
import math
import os
import signal
import time

import pytest
import torch

import devices
import files
import runs
import train
from tests.conftest import ROOT, TINY, run


def test_newest_run_is_the_last_checkpoint_written(tmp_path):
    with pytest.raises(SystemExit, match="no run with a checkpoint.pt"):
        runs.newest_run(str(tmp_path))
    for name in ("b", "a"):                          # "a" is written last, though it sorts first
        os.makedirs(tmp_path / name)
        files.save_atomic({"step": 1}, str(tmp_path / name / "checkpoint.pt"))
        time.sleep(0.01)
    os.makedirs(tmp_path / "empty")                  # a run without a checkpoint is not a candidate
    assert runs.newest_run(str(tmp_path)) == str(tmp_path / "a")
    assert not any(f.endswith(".tmp") for f in os.listdir(tmp_path / "a"))


def test_cache_sits_beside_the_run_directories(tmp_path):
    assert files.cache_dir(str(tmp_path / "runs" / "x")) == str(tmp_path / "runs" / ".cache")
    assert files.cache_dir() == os.path.join("runs", ".cache")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_cuda_without_a_gpu_is_a_clear_error():
    assert devices.pick_device(None).type == "cpu"
    with pytest.raises(SystemExit, match="no CUDA GPU"):
        devices.pick_device("cuda")


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
    with pytest.raises(files.SaveError, match="disk holding .* is full.*partial file is removed.*is kept"):
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
