"""The command line of every script, fuzzed with a fixed seed: numbers (0, negative, nan, inf, huge) for
each numeric flag, and paths (missing, a file, a link, a dangling link, unwritable, a folder where a file is
expected, a hard link, a FIFO, a name longer than the file system allows) for each path argument.
Every draw must end as a user expects, with an exit code and never a traceback: a usage error, a
one-paragraph message, or the work done. What a draw starts is cut short at its first augmentation (as
Ctrl-C would cut it), since what is fuzzed here is the command line, not the training."""
import os
import random
import shutil
import signal
import subprocess
import sys

import pytest

from tools import bench
from tools import plots
import test as evaluate
import train
from machinery.runs import cli
from tests.conftest import ROOT, TINY

NUMBERS = ["0", "-1", "-2.5", "nan", "inf", "-inf", "1e308", "10000000000000"]
PATHS = ["missing", "file", "link", "dangling", "unwritable", "folder", "hardlink", "fifo", "toolong"]
NUMERIC = {
    "train.py": [f"--{k.replace('_', '-')}" for k in train.DEFAULTS if k not in ("dataset", "data", "arch", "stem",
                 "predictor", "optimizer", "lars_clip", "tau_schedule", "blur", "normalize", "device", "compile",
                 "stream", "out", "recipe", "cache_dir")],
    "test.py": ["--epochs", "--lr", "--k", "--subset", "--test-subset", "--image-size", "--labels", "--finetune-epochs",
                "--finetune-lr", "--seed"],
    "plots.py": ["--random-knn"],
    "bench.py": ["--batch-size", "--image-size", "--hidden-dim", "--workers", "--images", "--repeats", "--steps",
                 "--warmup", "--peak-tflops"],
}
PATH_ARGS = {"train.py": ["--data", "--out", "--resume", "--cache-dir"], "test.py": ["run", "--data"],
             "plots.py": ["curves", "views", "--out"], "bench.py": ["--data"]}
DRAWS = {"train.py": 24, "test.py": 24, "plots.py": 8, "bench.py": 12}   # numbers drawn; paths: every one


def draws(script, seed=0):
    """The draws fuzzed for one script: every kind of path for every path argument, and a fixed sample of
    the (flag, number) pairs."""
    numbers = [(flag, value) for flag in NUMERIC[script] for value in NUMBERS]
    return [(arg, kind) for arg in PATH_ARGS[script] for kind in PATHS] + \
        random.Random(f"{script}-{seed}").sample(numbers, min(DRAWS[script], len(numbers)))


@pytest.fixture
def paths(tmp_path):
    """Each kind of path a user may pass by mistake, made in tmp_path."""
    (tmp_path / "file.txt").write_text("not what was asked for")
    os.symlink(tmp_path / "file.txt", tmp_path / "link")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("a user's folder")
    os.link(tmp_path / "file.txt", tmp_path / "hardlink")
    os.mkfifo(tmp_path / "fifo")                      # a reader that opens it blocks: a hang, if any, fails the test
    return dict(missing=str(tmp_path / "missing"), file=str(tmp_path / "file.txt"), link=str(tmp_path / "link"),
                dangling=str(tmp_path / "dangling"), folder=str(tmp_path / "folder"),
                unwritable="/proc/byol-fuzz",        # /proc takes no new files, not even from root
                hardlink=str(tmp_path / "hardlink"), fifo=str(tmp_path / "fifo"), toolong=str(tmp_path / ("x" * 300)))


def argv_for(script, arg, value, paths, base, tmp_path, i):
    """The command line of one draw: the script's working command with one argument replaced."""
    if value in PATHS:
        value = paths[value]
        if script == "train.py" and arg == "--resume":
            return ["--resume", value]
        if arg in ("run", "curves"):
            return [value, *base[1:]] if script == "test.py" else ["curves", value, "--out", str(tmp_path / "c.png")]
        if arg == "views":
            return ["views", "--data", value, "--out", str(tmp_path / f"v{i}.png")]
    return [*base, arg, value] if not value.startswith("-") else [*base, f"{arg}={value}"]


def problem(main, argv, capsys):
    """Runs main(argv) as its script's __main__ does (runs.cli); returns what a user would see wrong (an
    exception that is not an exit, a printed traceback, an exit that is no code, no answer in 120 s: a hang,
    as on a FIFO), or None."""
    def hung(signum, frame):
        raise TimeoutError("no answer within 120 s: it hangs")
    before = signal.signal(signal.SIGALRM, hung)
    signal.alarm(120)
    try:
        cli(lambda: main(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    except Exception as e:                          # what reaches the user as a traceback
        return f"{argv}: {type(e).__name__}: {e}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)
    said = capsys.readouterr()
    if "Traceback" in said.out + said.err:
        return f"{argv}: printed a traceback: {said.err[-1000:]}"
    if not (code is None or isinstance(code, (int, str))):
        return f"{argv}: exit {code!r}"
    return None


@pytest.fixture
def stop_at_first_view(monkeypatch):
    """Ctrl-C at the first augmentation: a draw that starts to train stops there, as a user would stop it."""
    augment = train.Augment.__call__

    def interrupt(self, x):
        os.kill(os.getpid(), signal.SIGINT)
        return augment(self, x)
    monkeypatch.setattr(train.Augment, "__call__", interrupt)


def test_fuzz_train_command_line(image_root, tmp_path, paths, capsys, stop_at_first_view):
    problems = []
    for i, (arg, value) in enumerate(draws("train.py")):
        base = ["--data", str(image_root / "train"), "--subset", "32", "--epochs", "1", "--knn-every", "0",
                "--out", str(tmp_path / f"run{i}"), *TINY]
        problems.append(problem(train.main, argv_for("train.py", arg, value, paths, base, tmp_path, i), capsys))
    assert not any(problems), [p for p in problems if p]


def test_fuzz_test_command_line(trained, image_root, tmp_path, paths, capsys):
    run_dir = shutil.copytree(trained, tmp_path / "run", ignore=shutil.ignore_patterns("lock"))
    problems = []
    for i, (arg, value) in enumerate(draws("test.py")):
        base = [str(run_dir), "--data", str(image_root), "--epochs", "1", "--device", "cpu"]
        problems.append(problem(evaluate.main, argv_for("test.py", arg, value, paths, base, tmp_path, i), capsys))
    assert not any(problems), [p for p in problems if p]


def test_fuzz_plots_command_line(trained, image_root, tmp_path, paths, capsys):
    problems = []
    for i, (arg, value) in enumerate(draws("plots.py")):
        base = ["curves", trained, "--out", str(tmp_path / f"c{i}.png")]
        problems.append(problem(plots.main, argv_for("plots.py", arg, value, paths, base, tmp_path, i), capsys))
    assert not any(problems), [p for p in problems if p]


def test_fuzz_bench_command_line(image_root, tmp_path, paths, capsys, monkeypatch):
    def stop(*args):
        raise KeyboardInterrupt                       # the first measurement: bench's work is not fuzzed
    monkeypatch.setattr(bench, "bench_augment", stop)
    problems = []
    for i, (arg, value) in enumerate(draws("bench.py")):
        base = ["--quick", "--device", "cpu", "--data", str(image_root / "train")]
        problems.append(problem(bench.main, argv_for("bench.py", arg, value, paths, base, tmp_path, i), capsys))
    assert not any(problems), [p for p in problems if p]


@pytest.mark.parametrize("script, args", [("train.py", ["--data", "DATA", "--base-lr=nan"]),
                                          ("test.py", ["RUN", "--lr=nan"]),
                                          ("plots.py", ["curves", "RUN", "--random-knn=nan"]),
                                          ("bench.py", ["--quick", "--device", "foo"])])
def test_a_bad_draw_on_the_real_command_line_is_one_message(script, args, trained, image_root):
    """One draw per script as a user types it: a subprocess, through its __main__ and runs.cli."""
    args = [{"DATA": str(image_root / "train"), "RUN": trained}.get(a, a) for a in args]
    path = script if script in ("train.py", "test.py") else os.path.join("tools", script)
    r = subprocess.run([sys.executable, path, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "error" in r.stderr, (args, r.stderr[-2000:])


def test_the_fuzz_reaches_every_kind_of_value():
    """The sample is fixed by its seed and, over the four scripts, reaches every kind of number and path."""
    assert draws("train.py") == draws("train.py") != draws("train.py", seed=1)
    drawn = {value for script in DRAWS for _, value in draws(script)}
    assert set(NUMBERS) | set(PATHS) <= drawn
