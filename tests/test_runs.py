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
from machinery import folders
from machinery import runs
from tests.conftest import ROOT, TINY, main_of


def test_newest_run_is_the_last_checkpoint_written(tmp_path):
    with pytest.raises(SystemExit, match="no run with a checkpoint.pt"):
        folders.newest_run(str(tmp_path))
    for name in ("b", "a"):                          # "a" is written last, though it sorts first
        os.makedirs(tmp_path / name)
        files.save_atomic({"step": 1}, str(tmp_path / name / "checkpoint.pt"))
        time.sleep(0.01)
    os.makedirs(tmp_path / "empty")                  # a run without a checkpoint is not a candidate
    assert folders.newest_run(str(tmp_path)) == str(tmp_path / "a")
    assert not any(f.endswith(".tmp") for f in os.listdir(tmp_path / "a"))


def test_the_cache_is_the_users_own_folder_never_one_beside_out(tmp_path, monkeypatch):
    """It used to sit in <parent of --out>/.cache, where another user could plant one (issue 23): now
    $XDG_CACHE_HOME/byol-reproduction, ~/.cache/byol-reproduction when that is unset or relative, or --cache-dir."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert files.cache_dir() == str(tmp_path / "xdg" / "byol-reproduction")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for xdg in ("", "relative/path"):
        monkeypatch.setenv("XDG_CACHE_HOME", xdg)
        assert files.cache_dir() == str(tmp_path / "home" / ".cache" / "byol-reproduction")
    assert files.cache_dir(str(tmp_path / "mine")) == str(tmp_path / "mine")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_cuda_without_a_gpu_is_a_clear_error():
    assert devices.pick_device(None).type == "cpu"
    with pytest.raises(SystemExit, match="no CUDA GPU"):
        devices.pick_device("cuda")


# ---- Reliability: nothing good is overwritten, preemption and mistakes lose nothing (issue 11) ----

def _copy_run(trained, tmp_path, name="run"):
    """A copy of the finished tiny run to change (its decoded data stays in the session's user cache)."""
    import shutil
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
    holder = subprocess.Popen([sys.executable, "-c", f"import time; from machinery import folders; "
                               f"f = folders.lock({str(run_dir)!r}); print('locked', flush=True); time.sleep(120)"], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "locked"
    r = main_of("train.py", "--resume", str(run_dir), "--epochs", "3")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "in use" in r.stderr
    holder.kill()                                               # kill -9: the OS frees the lock
    holder.wait()
    folders.lock(str(run_dir)).close()


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
    epochs, seconds = fit_epochs(10**6, 195, 0, 1e-9, 0.0, 0.0)   # a million minutes of 1 ns steps: 3e14 epochs,
    assert epochs == 10**6 and seconds <= 6e7                      # of which --epochs' bound, 10**6, is planned


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
    for attempt in range(3):   # a SIGINT that lands in a library's bare `except:` as torch imports is lost
        out = tmp_path / f"run{attempt}"
        job = subprocess.Popen([sys.executable, "train.py", *_tiny(image_root, out)], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)
        job.send_signal(signal.SIGINT)
        _, stderr = job.communicate(timeout=120)
        if job.returncode != 0:
            break
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
    args = ["--data", str(image_root / "train"), "--subset", "16", "--epochs", "1", "--knn-every", "0", *TINY,
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


# ---- Only what is ours (issue 23): a user's folder, a checkpoint from elsewhere, preemption with --stream ----

def _snapshot(folder):
    """Each file of folder (but the lock) with its inode and time: a file replaced or rewritten shows."""
    return {f: (os.stat(os.path.join(folder, f)).st_ino, os.stat(os.path.join(folder, f)).st_mtime_ns)
            for f in os.listdir(folder) if f != "lock"}


@pytest.mark.parametrize("mine", [{"config.json": '{"batch_size": 8, "note": "my own experiment"}'},
                                  {"log.jsonl": '{"step": 1, "loss": 0.5}\n'},
                                  {"config.json": "[]", "log.jsonl": "my notes\n"}, {"lock": "my lock"}])
def test_a_users_folder_with_files_of_our_names_is_refused_and_left_as_it_was(image_root, tmp_path, mine):
    """--out DIR holding a config.json or log.jsonl of the user's used to get a note, then its config replaced and
    its log deleted; a user's lock was truncated. A folder is a run of ours only by config.json's mark."""
    out = tmp_path / "mine"
    out.mkdir()
    for name, text in mine.items():
        (out / name).write_text(text)
    r = main_of("train.py", *_tiny(image_root, out))
    assert r.returncode != 0 and "Traceback" not in r.stderr and "did not write" in r.stderr, r.stderr[-2000:]
    assert {f: (out / f).read_text() for f in os.listdir(out)} == mine


def test_a_users_file_named_lock_is_never_opened_and_a_new_lock_is_made_exclusively(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "lock").write_text("my lock")
    with pytest.raises(SystemExit, match="not a lock train.py made"):
        folders.lock(str(out))
    assert (out / "lock").read_text() == "my lock"
    (out / "lock").unlink()
    folders.lock(str(out)).close()                        # none there: a new one is made (O_EXCL)
    assert (out / "lock").read_text().startswith("pid ")


def test_a_start_that_fails_in_a_new_folder_leaves_no_lock_and_a_starting_run_is_in_use(image_root, tmp_path,
                                                                                     monkeypatch):
    """A start that failed after making its lock (a full disk at config.json) left the lock in a folder that
    was no run of ours, so every later run there was refused as "not a lock train.py made"; and a second
    start meeting a first one's new lock was told to remove it, which would let two runs write one folder."""
    from machinery.files import SaveError

    def full_disk(*args):
        raise SaveError("Could not write config.json: the disk is full")
    monkeypatch.setattr(runs, "save_json", full_disk)
    out = tmp_path / "run"
    r = main_of("train.py", *_tiny(image_root, out))
    assert r.returncode != 0 and "disk is full" in r.stderr and not os.path.lexists(out / "lock"), r.stderr[-2000:]
    out.mkdir(exist_ok=True)
    starting = folders.lock(str(out), ours=False)           # a first start, under way: its lock is new
    r = main_of("train.py", *_tiny(image_root, out))
    assert r.returncode != 0 and "in use" in r.stderr and "rm " not in r.stderr, r.stderr[-2000:]
    starting.close()


def test_a_hard_link_at_lock_is_refused_and_the_file_it_links_to_untouched(trained, tmp_path):
    """The symlink check did not see hard links: the file linked to was truncated."""
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    run_dir = _copy_run(trained, tmp_path)
    os.link(victim, run_dir / "lock")
    before = _snapshot(run_dir)
    r = main_of("train.py", "--resume", str(run_dir), "--epochs", "3")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "hard link" in r.stderr, r.stderr[-2000:]
    assert victim.read_text() == "keep me" and _snapshot(run_dir) == before


def test_an_out_name_longer_than_the_file_system_allows_is_one_message(image_root, tmp_path):
    r = main_of("train.py", *_tiny(image_root, tmp_path / ("x" * 300) / "run"))
    assert r.returncode != 0 and "Traceback" not in r.stderr and "300 bytes long" in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("kind, said", [("folder", "a folder"), ("fifo", "FIFO")])
def test_a_log_that_is_a_folder_or_a_fifo_is_named_before_anything_is_written(trained, tmp_path, kind, said):
    """A folder at log.jsonl was a traceback, a FIFO a hang; now one message, and the run folder is as it was."""
    run_dir = _copy_run(trained, tmp_path)
    os.remove(run_dir / "log.jsonl")
    (os.mkdir if kind == "folder" else os.mkfifo)(run_dir / "log.jsonl")
    before = _snapshot(run_dir)
    r = main_of("train.py", "--resume", str(run_dir), "--epochs", "3")
    assert r.returncode != 0 and "Traceback" not in r.stderr and said in r.stderr, r.stderr[-2000:]
    assert _snapshot(run_dir) == before


def test_a_checkpoint_that_is_a_fifo_is_named_not_waited_on(trained, tmp_path):
    run_dir = _copy_run(trained, tmp_path)
    os.remove(run_dir / "checkpoint.pt")
    os.mkfifo(run_dir / "checkpoint.pt")
    r = main_of("train.py", "--resume", str(run_dir), "--epochs", "3")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "FIFO" in r.stderr, r.stderr[-2000:]


@pytest.fixture(scope="module")
def saved(trained):
    """The tiny run's checkpoint, loaded once for the tests that damage a copy of it."""
    return torch.load(os.path.join(trained, "checkpoint.pt"), weights_only=True)


def _run_with(trained, tmp_path, ckpt):
    """A run folder holding the tiny run's config.json and log.jsonl, its encoder.pt (a hard link: cheaper than
    a copy, and a rewrite would replace the link, not the file), and the checkpoint ckpt."""
    import shutil
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("config.json", "log.jsonl"):
        shutil.copy2(os.path.join(trained, name), run_dir / name)
    os.link(os.path.join(trained, "encoder.pt"), run_dir / "encoder.pt")
    torch.save(ckpt, run_dir / "checkpoint.pt")
    return run_dir


def test_a_non_finite_checkpoint_is_refused_before_anything_is_written(trained, saved, tmp_path):
    """Resuming one used to replace a good encoder.pt with its weights first, then say the last good
    checkpoint is kept."""
    import copy
    ckpt = copy.deepcopy(saved)
    ckpt["online"]["encoder.conv1.weight"][0] = float("nan")
    run_dir = _run_with(trained, tmp_path, ckpt)
    before = _snapshot(run_dir)
    r = main_of("train.py", "--resume", str(run_dir), "--epochs", "3")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "NaN or Inf" in r.stderr, r.stderr[-2000:]
    assert _snapshot(run_dir) == before                         # encoder.pt, config.json and the log as they were


DAMAGES = {  # what a checkpoint from elsewhere may hold, and the word its message must name
    "batch_size 0": (lambda c: c["config"].update(batch_size=0), "batch_size"),
    "an unknown arch": (lambda c: c["config"].update(arch="vgg16"), "arch"),
    "an unknown normalisation": (lambda c: c["config"].update(normalize="mnist"), "normalize"),
    "image_size 0": (lambda c: c["config"].update(image_size=0), "image_size"),
    "a string for a number": (lambda c: c["config"].update(base_lr="0.1"), "base_lr"),
    "a negative step": (lambda c: c.update(step=-5), "step"),
    "a perm out of range": (lambda c: c.update(perm=c["perm"] + 1), "perm"),
    "seconds NaN": (lambda c: c.update(seconds=float("nan")), "seconds"),
    "a wrong-shaped optimizer state": (lambda c: c["optimizer"]["state"][0].update(v=torch.zeros(3)), "optimizer"),
    "a wrong-shaped probe state": (lambda c: c["probe_optimizer"]["state"][0].update(momentum_buffer=torch.zeros(3)),
                                   "optimizer"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_checkpoint_fields_pass_the_checks_of_the_command_line(trained, saved, tmp_path, damage):
    """Each used to be a traceback (a negative step trained at a negative lr and ended "Done"): now one message
    naming the field, before anything in the run folder is written."""
    import copy
    change, word = DAMAGES[damage]
    ckpt = copy.deepcopy(saved)
    change(ckpt)
    run_dir = _run_with(trained, tmp_path, ckpt)
    before = _snapshot(run_dir)
    r = main_of("train.py", "--resume", str(run_dir), "--epochs", "3")
    assert r.returncode != 0 and "Traceback" not in r.stderr and word in r.stderr, r.stderr[-2000:]
    assert "Done" not in r.stdout and _snapshot(run_dir) == before


def test_a_checkpoints_optimizer_numbers_are_never_used_the_configs_are(saved):
    """A string or a NaN among a checkpoint's optimizer hyper-parameters used to reach the step (a TypeError
    traceback at the first step, or a run that trains on NaN): the groups' numbers are the optimizer's built
    from the checked config, and only the state tensors come from the checkpoint."""
    import copy
    from optim import make_optimizer
    from tests.conftest import small_byol
    damaged = copy.deepcopy(saved["optimizer"])
    for group in damaged["param_groups"]:
        group.update(weight_decay="x", momentum=float("nan"), eta=-1.0)
    optimizer, built = (make_optimizer(small_byol(), saved["config"]) for _ in range(2))
    optimizer.load_state_dict(runs.optimizer_state(damaged, optimizer))
    for group, own in zip(optimizer.param_groups, built.param_groups):
        assert {k: v for k, v in group.items() if k != "params"} == {k: v for k, v in own.items() if k != "params"}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert all(torch.equal(optimizer.state[params[i]]["v"], s["v"]) for i, s in saved["optimizer"]["state"].items())


def test_resume_switches_between_the_in_memory_and_the_stream_path_both_ways(trained, tmp_path):
    """Both paths fingerprint an ImageFolder the same way (names, sizes, a sample of the bytes): switching
    used to be refused either way as "other content", though the flag list calls --stream resumable."""
    run_dir = _copy_run(trained, tmp_path)
    r = main_of("train.py", "--resume", str(run_dir), "--epochs", "3", "--stream", "--workers", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    r = main_of("train.py", "--resume", str(run_dir), "--epochs", "4", "--no-stream")
    assert r.returncode == 0, r.stderr[-2000:]
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"] == 16


def test_sigterm_to_the_process_group_of_a_stream_run_saves_and_it_resumes(image_root, tmp_path):
    """SLURM and torchrun's agent send SIGTERM to every process of the job: the DataLoader workers used to die
    first and the main process to end in a traceback, with nothing saved. A real process group on the CPU."""
    import re
    import subprocess
    import sys
    out = tmp_path / "run"
    job = subprocess.Popen([sys.executable, "train.py", *_tiny(image_root, out, "--stream", "--workers", "1",
                                                               "--epochs", "50", "--log-every", "1")],
                           cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not (os.path.exists(out / "log.jsonl") and os.path.getsize(out / "log.jsonl")) and job.poll() is None \
                and time.time() < deadline:
            time.sleep(0.1)
        os.killpg(job.pid, signal.SIGTERM)
        stdout, stderr = job.communicate(timeout=240)
    finally:
        try:
            os.killpg(job.pid, signal.SIGKILL)          # whatever of the group is left
        except ProcessLookupError:
            pass
    assert job.returncode != 0 and "Traceback" not in stderr and "Stopped by SIGTERM" in stderr, stderr[-3000:]
    step = int(re.search(r"at step (\d+)/", stderr).group(1))
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == step
    epochs = step // 4 + 1                                 # 32 images, batch 8: 4 steps an epoch
    r = main_of("train.py", "--resume", str(out), "--epochs", str(epochs), "--workers", "0")
    assert r.returncode == 0 and torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 4 * epochs


def _children():
    """The process ids of this process's children (Linux)."""
    import glob
    return {int(pid) for f in glob.glob(f"/proc/{os.getpid()}/task/*/children") for pid in open(f).read().split()}


def test_a_stream_worker_killed_from_outside_saves_the_weights_and_names_memory(image_root, tmp_path, monkeypatch):
    """What the out-of-memory killer does: a worker ends by SIGKILL. The run used to end in a RuntimeError
    traceback; now the weights of the step it stopped at are saved (finite, at a step boundary), the message
    names memory and the flags that lower it, and the run resumes."""
    import re
    before, calls, augment = _children(), [], train.Augment.__call__

    def kill_the_worker(self, x):
        calls.append(1)
        if len(calls) == 1:
            for pid in _children() - before:            # the DataLoader worker this run started
                os.kill(pid, signal.SIGKILL)
        return augment(self, x)
    monkeypatch.setattr(train.Augment, "__call__", kill_the_worker)
    out = tmp_path / "run"
    r = main_of("train.py", *_tiny(image_root, out, "--stream", "--workers", "1", "--epochs", "2"))
    assert r.returncode != 0 and "Traceback" not in r.stderr and "SIGKILL" in r.stderr, r.stderr[-3000:]
    assert "memory" in r.stderr and "--workers" in r.stderr and "--batch-size" in r.stderr
    step = int(re.search(r"at step (\d+) ", r.stderr).group(1))
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == step > 0
    monkeypatch.setattr(train.Augment, "__call__", augment)
    r = main_of("train.py", "--resume", str(out), "--workers", "0")
    assert r.returncode == 0 and torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 8, r.stderr[-2000:]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_the_minutes_trial_says_what_is_on_disk(image_root, tmp_path, monkeypatch, signum):
    """Ctrl-C there used to say "nothing on disk was changed" after config.json and lock were written, and
    SIGTERM to end without a word. Now the run stops before its first step and says so; the same command
    starts it again. (The trial's timings are stood in for: a step of a second, so one epoch is planned.)"""
    def signal_during_the_trial(*args):
        os.kill(os.getpid(), signum)
        return 1.0, 0.0, 0.0
    monkeypatch.setattr(train, "time_trial", signal_during_the_trial)
    out = tmp_path / "run"
    r = main_of("train.py", *_tiny(image_root, out, "--minutes", "0.01"))
    assert r.returncode != 0 and "Traceback" not in r.stderr and "before the first step" in r.stderr, r.stderr[-2000:]
    assert "nothing on disk was changed" not in r.stderr and not os.path.exists(out / "checkpoint.pt")
    if signum == signal.SIGTERM:
        monkeypatch.setattr(train, "time_trial", lambda *args: (1.0, 0.0, 0.0))
        r = main_of("train.py", *_tiny(image_root, out, "--minutes", "0.01"))
        assert r.returncode == 0 and os.path.exists(out / "checkpoint.pt"), r.stderr[-2000:]


def test_compile_without_a_compiler_is_a_message_before_any_work(image_root, tmp_path, monkeypatch):
    """It used to fail after 47 s of compiling, in a traceback."""
    monkeypatch.setattr(devices.shutil, "which", lambda name: None)
    r = main_of("train.py", *_tiny(image_root, tmp_path / "run", "--compile"))
    assert r.returncode != 0 and "Traceback" not in r.stderr and "compiler" in r.stderr, r.stderr[-2000:]
    assert not os.path.exists(tmp_path / "run")


def test_newest_run_takes_a_run_that_kept_only_its_encoder_where_an_encoder_will_do(tmp_path):
    for name, weights in (("with-checkpoint", "checkpoint.pt"), ("encoder-only", "encoder.pt")):
        os.makedirs(tmp_path / name)
        files.save_atomic({}, str(tmp_path / name / weights))
        time.sleep(0.01)
    assert folders.newest_run(str(tmp_path), names=("encoder.pt", "checkpoint.pt")) == str(tmp_path / "encoder-only")
    assert folders.newest_run(str(tmp_path)) == str(tmp_path / "with-checkpoint")    # --resume needs a checkpoint


def test_a_run_saved_before_the_mark_resumes_and_a_users_config_beside_a_checkpoint_is_kept(trained, tmp_path):
    """A run written before config.json carried "byol_run" resumes (its checkpoint shows it is ours, its config
    holds train.py's keys) and gains the mark; a checkpoint dropped beside a user's own config.json does not
    resume there, and the config keeps its bytes."""
    run_dir = _copy_run(trained, tmp_path)
    cfg = json.load(open(run_dir / "config.json"))
    del cfg["byol_run"]
    json.dump(cfg, open(run_dir / "config.json", "w"))
    assert not folders.is_run_folder(str(run_dir))
    r = main_of("train.py", "--resume", str(run_dir), "--epochs", "3", "--knn-every", "0")
    assert r.returncode == 0 and folders.is_run_folder(str(run_dir)), r.stderr[-2000:]
    (run_dir / "config.json").write_text('{"my": "own settings"}')
    r = main_of("train.py", "--resume", str(run_dir), "--epochs", "4")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "did not write" in r.stderr, r.stderr[-2000:]
    assert (run_dir / "config.json").read_text() == '{"my": "own settings"}'


def test_a_checkpoint_beside_a_users_log_and_lock_does_not_resume_there_and_alone_it_does(trained, tmp_path):
    """A checkpoint.pt dropped into a user's folder (Downloads, say) that holds a log.jsonl and a lock of the
    user's: the resume used to trim that log and truncate that lock. Now it is refused and both keep their
    bytes; the same checkpoint alone in a folder resumes, and the folder becomes a run of ours."""
    import shutil
    mine = tmp_path / "downloads"
    mine.mkdir()
    shutil.copy2(os.path.join(trained, "checkpoint.pt"), mine / "checkpoint.pt")
    (mine / "log.jsonl").write_text('{"step": 99, "mine": true}\n{"note": "kept"}\n')
    (mine / "lock").write_text("my own lock\n")
    before = _snapshot(mine)
    r = main_of("train.py", "--resume", str(mine), "--epochs", "3", "--knn-every", "0")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "did not write" in r.stderr, r.stderr[-2000:]
    assert _snapshot(mine) == before and (mine / "lock").read_text() == "my own lock\n"
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy2(os.path.join(trained, "checkpoint.pt"), alone / "checkpoint.pt")
    r = main_of("train.py", "--resume", str(alone), "--epochs", "3", "--knn-every", "0")
    assert r.returncode == 0 and folders.is_run_folder(str(alone)), r.stderr[-2000:]
