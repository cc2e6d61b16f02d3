"""plots.py: the README's pictures, drawn from a run's log and from the training images."""
import json
import os

import pytest

import plots
import test as evaluate


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
