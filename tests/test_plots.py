"""plots.py: the README's pictures, drawn from a run's log and from the training images."""
import json
import os
import subprocess
import sys

import pytest

from tools import plots
import test as evaluate
from tests.conftest import ROOT


def _log(path):
    os.makedirs(path, exist_ok=True)
    lines = [dict(epoch=0.5, step=1, loss=3.0, lr=0.1, tau=0.99, z_std=0.06),
             dict(epoch=1.0, step=2, loss=2.5, lr=0.2, tau=0.995, z_std=0.05, probe_top1=0.3, knn_top1=0.25),
             dict(epoch=2.0, step=4, loss=2.0, lr=0.0, tau=1.0, z_std=0.002, probe_top1=0.4)]
    with open(os.path.join(path, "log.jsonl"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in lines) + '{"epoch": 2.5, "lo')   # a line cut short
    return path


def test_plot_writes_a_png_from_a_log_with_missing_keys(tmp_path, monkeypatch):
    out = plots.draw_curves(_log(str(tmp_path / "run")), out=str(tmp_path / "a" / "curves.png"))
    assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    monkeypatch.chdir(tmp_path)                                            # the CLI writes README.assets/
    evaluate.main(["--plot", "run"])
    assert (tmp_path / "README.assets" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plots.main(["curves", "run", "--out", "elsewhere.png"])                 # --out names the file
    assert (tmp_path / "elsewhere.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="no log"):
        plots.draw_curves(str(tmp_path / "nowhere"))


def test_views_picture_from_an_image_folder(image_root, tmp_path):
    out = plots.draw_views(str(image_root / "train"), out=str(tmp_path / "views.png"))
    assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="does not exist"):
        plots.draw_views(str(tmp_path / "nowhere"))


# ---- what plots.py survives ----------------------------------------------------------------------------

def test_an_out_that_matplotlib_cannot_write_is_named_with_the_formats_it_can(tmp_path):
    """--out x.txt was matplotlib's traceback, after the drawing: now refused first, listing .png and the rest."""
    with pytest.raises(SystemExit, match=r"cannot draw a \.txt picture.*\.pdf.*\.png"):
        plots.draw_curves(_log(str(tmp_path / "run")), out=str(tmp_path / "x.txt"))
    assert not os.path.exists(tmp_path / "x.txt")


def test_an_out_without_an_extension_reports_the_png_it_writes(tmp_path, capsys):
    """matplotlib writes out/x.png for --out out/x; the script said it wrote out/x, which does not exist."""
    plots.main(["curves", _log(str(tmp_path / "run")), "--out", str(tmp_path / "out" / "x")])
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'out' / 'x.png'}"
    assert (tmp_path / "out" / "x.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(tmp_path / "out") == ["x.png"]


@pytest.mark.parametrize("value", ["nan", "inf", "-0.1", "35", "1e12"])
def test_a_random_knn_that_is_no_top1_is_a_usage_error(tmp_path, value, capsys):
    with pytest.raises(SystemExit) as e:
        plots.main(["curves", _log(str(tmp_path / "run")), f"--random-knn={value}"])
    assert e.value.code == 2 and "--random-knn" in capsys.readouterr().err


def test_an_out_in_a_missing_folder_is_made_and_one_that_cannot_be_is_a_clear_error(tmp_path):
    run = _log(str(tmp_path / "run"))
    assert os.path.isfile(plots.draw_curves(run, out=str(tmp_path / "new" / "deeper" / "c.png")))
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit, match="cannot write .*a-file"):           # a folder that cannot be made
        plots.draw_curves(run, out=str(tmp_path / "a-file" / "c.png"))
    with pytest.raises(SystemExit, match="is a folder"):
        plots.draw_curves(run, out=str(tmp_path / "new"))


def test_curves_draw_only_the_values_that_are_numbers(tmp_path, monkeypatch):
    """A hand-edited or foreign log ("loss": "abc", null, NaN, true, a list, an epoch that is text) used to be
    drawn as categories on a text axis; now only finite numbers are drawn."""
    import matplotlib.axes
    drawn, plot = [], matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda ax, *xy, **kw: drawn.append(xy) or plot(ax, *xy, **kw))
    run = tmp_path / "run"
    run.mkdir()
    lines = [dict(epoch=1, loss=2.0, lr=0.1), dict(epoch=2, loss="abc", lr=None), dict(epoch=3, loss=float("nan"),
             lr=True), dict(epoch="4", loss=1.0), dict(epoch=5, loss=[1], lr=0.05, knn_top1="0.3"), dict(epoch=6, loss=1.5)]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    plots.draw_curves(str(run), out=str(tmp_path / "c.png"))
    assert drawn == [((1, 6), (2.0, 1.5)), ((1, 5), (0.1, 0.05))]          # loss, then lr; kNN: "not logged"
    (run / "log.jsonl").write_text('{"loss": 1.0}\n[1, 2]\n')
    with pytest.raises(SystemExit, match="no log line with an epoch"):
        plots.draw_curves(str(run), out=str(tmp_path / "c.png"))


def test_plots_on_the_command_line_gives_no_traceback_for_a_damaged_config(tmp_path):
    run = _log(str(tmp_path / "run"))
    (tmp_path / "run" / "config.json").write_text('{"proj_dim": 2')
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "plots.py"), "curves", run, "--out",
                        str(tmp_path / "c.png")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "config.json" in r.stderr, r.stderr[-2000:]


def test_a_log_holding_values_beyond_1e300_is_drawn_without_them(tmp_path):
    """A log holding +-1e308 was a traceback (matplotlib cannot scale an axis across it)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        dict(epoch=1, loss=1e308, lr=0.1), dict(epoch=2, loss=-1e308, lr=0.2), dict(epoch=3, loss=2.0, lr=-1e308)]))
    out = plots.draw_curves(str(run), out=str(tmp_path / "curves.png"))
    assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
