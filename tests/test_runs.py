"""runs.py and files.py: where runs and caches live, atomic saves, and what survives what: code in a
pickle, divergence, a second writer, kill -9, signals, a full disk, bad flags and bad folders."""
import json
import math
import os
import signal
import time

import pytest
import torch

import train
from machinery import devices
from machinery import files
from machinery import runs
from tests.conftest import ROOT, TINY, main_of


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
    r = main_of("train.py", "--resume", str(run_dir))
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
    holder = subprocess.Popen([sys.executable, "-c", f"import time; from machinery import runs; "
                               f"f = runs.lock({str(run_dir)!r}); print('locked', flush=True); time.sleep(120)"], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "locked"
    r = main_of("train.py", "--resume", str(run_dir), "--epochs", "3")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "in use" in r.stderr
    holder.kill()                                               # kill -9: the OS frees the lock
    holder.wait()
    from machinery import runs
    runs.lock(str(run_dir)).close()


def test_a_new_run_is_refused_in_a_folder_that_holds_one(trained):
    before = os.path.getmtime(os.path.join(trained, "checkpoint.pt"))
    r = main_of("train.py", "--data", "anything", "--out", trained, "--device", "cpu")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "--resume" in r.stderr
    assert os.path.getmtime(os.path.join(trained, "checkpoint.pt")) == before


def test_resume_after_a_kill_drops_repeated_log_lines_stale_files_and_an_old_encoder(trained, tmp_path,
                                                                                     monkeypatch):
    """What kill -9 leaves: log lines past the checkpoint, a half-written .tmp, a time-trial folder, and
    an encoder.pt older than the checkpoint. The resumed run cleans each up before its first step."""
    run_dir = _copy_run(trained, tmp_path)
    with open(run_dir / "log.jsonl", "a") as f:
        f.write(json.dumps(dict(step=9, loss=1.0)) + "\n" + '{"step": 10, "lo')
    (run_dir / ".checkpoint.pt.k2x9_a1q.tmp").write_bytes(b"half")      # files.save_atomic's names
    os.makedirs(run_dir / ".time-trial-0abc_xyz")                          # --minutes' scratch folder
    torch.save({k: torch.zeros_like(v) for k, v in torch.load(run_dir / "encoder.pt").items()}, run_dir / "encoder.pt")

    def crash(self, x):
        raise RuntimeError("crashed in the first step")
    monkeypatch.setattr(train.Augment, "__call__", crash)
    with pytest.raises(RuntimeError, match="crashed"):
        train.main(["--resume", str(run_dir), "--epochs", "3"])
    assert [json.loads(line)["step"] for line in open(run_dir / "log.jsonl")] == [2, 4, 6, 8]
    assert not (run_dir / ".checkpoint.pt.k2x9_a1q.tmp").exists() and not (run_dir / ".time-trial-0abc_xyz").exists()
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


def test_an_out_that_is_a_dangling_link_or_inside_a_file_is_refused_before_any_work(image_root, tmp_path):
    os.symlink(tmp_path / "gone", tmp_path / "link")
    (tmp_path / "file").write_text("")
    for out, said in ((tmp_path / "link", "a link to nothing"), (tmp_path / "file" / "run", "is a file")):
        r = main_of("train.py", "--data", str(image_root / "train"), "--out", str(out), *TINY)
        assert r.returncode != 0 and said in r.stderr, r.stderr
    assert not os.path.exists(tmp_path / "gone")


def test_an_out_that_is_a_file_or_read_only_is_refused_before_any_work(image_root, tmp_path):
    (tmp_path / "file").write_text("")
    r = main_of("train.py", "--data", str(image_root / "train"), "--out", str(tmp_path / "file"), *TINY)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "is a file" in r.stderr
    # sysfs takes no new files, not even from root: an unwritable folder on any Linux machine
    r = main_of("train.py", "--data", str(image_root / "train"), "--out", "/sys/byol-run", *TINY)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "not writable" in r.stderr, r.stderr


@pytest.mark.parametrize("drop", ["perm", "rng"])
def test_a_checkpoint_missing_its_data_order_or_rng_is_named(trained, tmp_path, drop):
    run_dir = _copy_run(trained, tmp_path)
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    del ckpt[drop]
    torch.save(ckpt, run_dir / "checkpoint.pt")
    with pytest.raises(SystemExit, match=f"not a checkpoint written by train.py: it lacks {drop}"):
        train.main(["--resume", str(run_dir), "--epochs", "3"])


# ---- Run folders you can trust (issue 17): nothing written through a link, no user file removed, no
# "Done" on a broken encoder, a message for every mistake ------------------------------------------

def _tiny(image_root, out, *flags):
    return ["--data", str(image_root / "train"), "--subset", "32", "--epochs", "1", "--knn-every", "0",
            "--out", str(out), *TINY, *flags]


def test_a_lock_that_is_a_symlink_is_refused_and_its_target_untouched(trained, image_root, tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    run_dir = _copy_run(trained, tmp_path)
    os.symlink(victim, run_dir / "lock")
    r = main_of("train.py", "--resume", str(run_dir), "--epochs", "3")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "lock" in r.stderr and "rm" in r.stderr
    new = tmp_path / "new"
    new.mkdir()
    os.symlink(victim, new / "lock")
    r = main_of("train.py", *_tiny(image_root, new))
    assert r.returncode != 0 and "Traceback" not in r.stderr and "lock" in r.stderr
    assert victim.read_text() == "keep me"


def test_dangling_links_in_the_run_folder_get_nothing_written_through_them(trained, image_root, tmp_path):
    """A link named like a temporary file (a new run) or like the log (a resumed run) points outside the
    run folder: the checkpoint is written beside it under a fresh name, the log is refused with a
    message, and nothing appears at either target."""
    outside = tmp_path / "outside"
    outside.mkdir()
    new = tmp_path / "new"
    new.mkdir()
    os.symlink(outside / "checkpoint", new / "checkpoint.pt.tmp")
    os.symlink(outside / "encoder", new / ".encoder.pt.tmp")
    train.main(_tiny(image_root, new))
    assert os.path.isfile(new / "checkpoint.pt") and not os.listdir(outside)
    run_dir = _copy_run(trained, tmp_path)
    os.remove(run_dir / "log.jsonl")
    os.symlink(outside / "log", run_dir / "log.jsonl")
    r = main_of("train.py", "--resume", str(run_dir), "--epochs", "3")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "symbolic link" in r.stderr
    assert not os.listdir(outside)


def test_a_new_run_in_a_folder_of_user_files_removes_none_of_them(image_root, tmp_path):
    """Files that only look like leftovers (*.tmp, time-trial-*) are the user's: a run started in their
    folder, --minutes and all, leaves every one of them."""
    out = tmp_path / "mine"
    (out / "time-trial-notes").mkdir(parents=True)
    (out / "time-trial-notes" / "a.txt").write_text("mine")
    for name in ("draft.tmp", "checkpoint.pt.tmp", ".hidden.tmp"):
        (out / name).write_text("mine")
    train.main(_tiny(image_root, out, "--minutes", "0.01"))
    assert (out / "time-trial-notes" / "a.txt").read_text() == "mine"
    assert all((out / name).read_text() == "mine" for name in ("draft.tmp", "checkpoint.pt.tmp", ".hidden.tmp"))
    assert not [f for f in os.listdir(out) if f.startswith(".time-trial-") or f.endswith(".tmp")
                and f not in ("draft.tmp", "checkpoint.pt.tmp", ".hidden.tmp")]


def _all_finite(ckpt):
    return all(v.isfinite().all() for part in ("online", "target", "predictor")
               for v in ckpt[part].values() if v.is_floating_point())


def test_a_kept_checkpoint_has_finite_batchnorm_statistics_too(image_root, tmp_path):
    """SGD at lr 1e10: BatchNorm's running variance turns Inf while the weights are still finite. The
    checkpoint the message says is kept must be good, buffers included, or the message says none is."""
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="diverged") as e:
        train.main(_tiny(image_root, out, "--optimizer", "sgd", "--base-lr", "1e10", "--epochs", "100",
                         "--log-every", "1"))
    if os.path.exists(out / "checkpoint.pt"):
        ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
        assert _all_finite(ckpt) and f"of step {ckpt['step']}" in str(e.value.code)
    else:
        assert "nothing is kept" in str(e.value.code)


def test_a_run_whose_batchnorm_statistics_are_inf_is_not_done(image_root, tmp_path, capsys):
    with pytest.raises(SystemExit, match="diverged") as e:
        train.main(_tiny(image_root, tmp_path / "run", "--optimizer", "sgd", "--base-lr", "3e8"))
    assert e.value.code != 0 and "Done" not in capsys.readouterr().out
    assert not os.path.exists(tmp_path / "run" / "encoder.pt")


FLOAT_FLAGS = [k for k, v in train.DEFAULTS.items() if isinstance(v, float)] + ["minutes"]


@pytest.mark.parametrize("flag", FLOAT_FLAGS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_nan_and_inf_are_usage_errors_for_every_float_flag(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--data", "anything", f"--{flag.replace('_', '-')}={value}"])
    assert e.value.code == 2 and "finite" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--hidden-dim", "10000000000"], ["--epochs", "10000000000"],
                                   ["--workers", "100000"], ["--seed", "-1"], ["--tau-base", "1.5"],
                                   ["--image-size", "1000000"], ["--minutes", "1e300"]])
def test_huge_numbers_are_usage_errors_not_hangs_or_exhausted_memory(flags, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--data", "anything", *flags])
    assert e.value.code == 2 and flags[0] in capsys.readouterr().err


def test_a_long_budget_is_planned_at_once():
    from machinery.budget import fit_epochs
    epochs, seconds = fit_epochs(10**6, 195, 0, 1e-9, 0.0, 0.0)   # a million minutes of 1 ns steps: 3e14 epochs
    assert epochs == int(6e7 / (195 * 1e-9)) and seconds <= 6e7


def test_a_diverging_online_probe_is_left_out_of_the_log_with_a_warning(image_root, tmp_path, capsys):
    out = train.main(_tiny(image_root, tmp_path / "run", "--probe-lr", "1e38", "--epochs", "2", "--knn-every", "1"))
    assert "online probe diverged" in capsys.readouterr().out
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert not any("probe_top1" in r or "probe_test_top1" in r for r in log[1:]) and "knn_top1" in log[-1]


def test_a_write_that_fails_inside_torch_save_names_its_cause(trained, tmp_path):
    """A real torch.save that runs out of room (a file-size limit: EFBIG inside torch's zip writer, which
    raises a RuntimeError over it): the message names the cause, and the previous files stay."""
    run_dir = _copy_run(trained, tmp_path)
    before = (run_dir / "checkpoint.pt").read_bytes()
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20)); sys.argv = ['train.py', '--resume', "
            f"{str(run_dir)!r}, '--epochs', '3']; from machinery import runs; import train; runs.cli(train.main)")
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "File too large" in r.stderr, r.stderr[-2000:]
    assert (run_dir / "checkpoint.pt").read_bytes() == before and not list(run_dir.glob(".*.tmp"))


def test_a_second_sigterm_inside_a_save_waits_for_a_whole_checkpoint(image_root, tmp_path, monkeypatch):
    """The first SIGTERM stops the run at step 3; the second arrives while that checkpoint is being written.
    The file is finished first, then the run stops at once, saying it is kept; it loads and resumes."""
    calls, augment, save = [], train.Augment.__call__, torch.save

    def sigterm_on_third_batch(self, x):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return augment(self, x)

    def sigterm_while_saving(obj, f):
        if len(calls) == 3 and "online" in obj:                         # the checkpoint of the stop
            os.kill(os.getpid(), signal.SIGTERM)
        save(obj, f)
    monkeypatch.setattr(train.Augment, "__call__", sigterm_on_third_batch)
    monkeypatch.setattr(torch, "save", sigterm_while_saving)
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="second SIGTERM.*checkpoint.pt from .* is kept"):
        train.main(_tiny(image_root, out, "--epochs", "2"))
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3
    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(train.Augment, "__call__", augment)
    train.main(["--resume", str(out)])
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 8


def test_a_zero_byte_checkpoint_is_named_on_resume(trained, tmp_path):
    run_dir = _copy_run(trained, tmp_path)
    (run_dir / "checkpoint.pt").write_bytes(b"")
    r = main_of("train.py", "--resume", str(run_dir), "--epochs", "3")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "empty (0 bytes)" in r.stderr


def test_a_log_with_stray_bytes_and_non_objects_still_resumes(trained, tmp_path):
    run_dir = _copy_run(trained, tmp_path)
    with open(run_dir / "log.jsonl", "ab") as f:
        f.write(b'\xff\xfe not utf-8\n[1, 2]\n"a string"\n{"step": "nine"}\n')
    train.main(["--resume", str(run_dir), "--epochs", "3"])
    assert [json.loads(line)["step"] for line in open(run_dir / "log.jsonl")] == [2, 4, 6, 8, 10, 12]


@pytest.mark.parametrize("config", ["not a dict", {"arch": "resnet18"}])
def test_a_damaged_config_inside_the_checkpoint_is_named(trained, tmp_path, config):
    run_dir = _copy_run(trained, tmp_path)
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    ckpt["config"] = config
    torch.save(ckpt, run_dir / "checkpoint.pt")
    r = main_of("train.py", "--resume", str(run_dir), "--epochs", "3")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "config inside" in r.stderr


def test_an_unknown_device_is_a_clear_error(image_root, tmp_path):
    r = main_of("train.py", *_tiny(image_root, tmp_path / "run")[:-2], "--device", "foo")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "--device 'foo'" in r.stderr


def test_ctrl_c_while_the_script_starts_is_one_line(image_root, tmp_path):
    """SIGINT half a second in, while torch is still being imported (or just after): one line, a non-zero
    exit, no traceback, and no run folder left behind."""
    import subprocess
    import sys
    import time
    out = tmp_path / "run"
    job = subprocess.Popen([sys.executable, "train.py", *_tiny(image_root, out)], cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    job.send_signal(signal.SIGINT)
    _, stderr = job.communicate(timeout=120)
    assert job.returncode != 0 and "Traceback" not in stderr and "Stopped" in stderr, stderr[-2000:]
    assert not os.path.exists(out / "checkpoint.pt")


def test_a_run_stopped_before_its_first_checkpoint_can_start_again(image_root, tmp_path):
    """A run that diverged (or was killed) before saving leaves config.json and log.jsonl: --resume says
    there is nothing to resume and how to start again; the same command then starts it again."""
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="nothing is kept"):
        train.main(_tiny(image_root, out, "--optimizer", "sgd", "--base-lr", "3e8"))
    assert not os.path.exists(out / "checkpoint.pt") and os.path.exists(out / "config.json")
    with pytest.raises(SystemExit, match="stopped before its first checkpoint.*without --resume"):
        train.main(["--resume", str(out)])
    train.main(_tiny(image_root, out))
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 4
    assert [json.loads(line)["step"] for line in open(out / "log.jsonl")] == [2, 4]   # the old log is gone


def test_resume_with_other_images_of_the_same_count_is_refused(trained, image_root, tmp_path):
    import shutil
    run_dir = _copy_run(trained, tmp_path)
    other = tmp_path / "other"
    shutil.copytree(image_root / "train", other)
    from PIL import Image
    for i, path in enumerate(sorted(other.rglob("*.jpg"))):          # other images, as many as before
        Image.new("RGB", (32, 32), (i, 0, 0)).save(path)
    r = main_of("train.py", "--resume", str(run_dir), "--epochs", "3", "--data", str(other))
    assert r.returncode != 0 and "Traceback" not in r.stderr and "not the ones" in r.stderr
    r = main_of("train.py", "--resume", str(run_dir), "--epochs", "3", "--data", str(shutil.copytree(
        image_root / "train", tmp_path / "moved")))                  # the same images, moved: fine
    assert r.returncode == 0, r.stderr[-2000:]


def test_a_run_saved_with_torch_sgd_resumes_exactly(image_root, tmp_path):
    """Runs of --optimizer sgd saved before it ran on optim.LARS hold torch.optim.SGD's state
    (momentum_buffer, SGD's group keys, lars still set on the weights' group): runs.optimizer_state reads
    it, and the resumed run ends on the weights of the same run resumed from this code's own state."""
    import shutil
    args = ["--data", str(image_root / "train"), "--subset", "32", "--epochs", "1", "--knn-every", "0", *TINY,
            "--optimizer", "sgd", "--base-lr", "0.1"]
    ours = train.main([*args, "--out", str(tmp_path / "ours")])
    old = shutil.copytree(ours, tmp_path / "old", ignore=shutil.ignore_patterns("lock"))
    ckpt = torch.load(old / "checkpoint.pt", weights_only=True)
    ckpt["optimizer"]["state"] = {i: {"momentum_buffer": s["v"]} for i, s in ckpt["optimizer"]["state"].items()}
    ckpt["optimizer"]["param_groups"] = [
        dict(params=g["params"], lr=g["lr"], momentum=0.9, dampening=0, weight_decay=g["weight_decay"],
             nesterov=False, maximize=False, foreach=None, differentiable=False, fused=None, lars=i == 0)
        for i, g in enumerate(ckpt["optimizer"]["param_groups"])]
    torch.save(ckpt, old / "checkpoint.pt")
    for run_dir in (ours, old):
        train.main(["--resume", str(run_dir), "--epochs", "2"])
    a, b = (torch.load(os.path.join(d, "checkpoint.pt"), weights_only=True) for d in (ours, old))
    assert all(torch.equal(v, b["online"][k]) for k, v in a["online"].items())
