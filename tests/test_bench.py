"""bench.py --quick as a user runs it: every field of its JSON line present and consistent, and the
FLOPs it counts for one step matching what BYOL's step must cost. No timing is asserted."""
import json
import math
import os
import statistics
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from models import resnet
from tools import bench
from tests.conftest import CIFAR_JPG, ROOT


@pytest.fixture(scope="module")
def report():
    out = subprocess.run([sys.executable, "tools/bench.py", "--quick", "--device", "cpu", "--graph"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])  # the JSON is the last line of stdout


def test_fields_are_present_and_consistent(report):
    assert report["device"] == "cpu" and report["torch_version"] == torch.__version__
    assert report["batch_size"] == 8 and report["quick"] and report["device_name"]
    if os.path.isdir(CIFAR_JPG):
        assert "real images" in report["images"], "fell back to random images although the JPEGs exist"
    aug, tv = report["aug_views_per_s"], report["torchvision_views_per_s"]
    assert aug > 0 and tv > 0
    assert report["aug_speedup"] == pytest.approx(aug / tv)

    steps = report["step_images_per_s"]
    assert set(steps) == set(bench.VARIANTS)
    assert steps["bf16"] is None and steps["compile"] is None  # no bf16 on CPU; --quick skips compile
    assert set(report["graph_images_per_s"]) == {"graph"} and report["graph_images_per_s"]["graph"] > 0  # no compile
    assert all(steps[v] > 0 for v in ("fp32", "channels_last"))
    e2e = report["end_to_end_images_per_s"]
    assert report["end_to_end_variant"] == "fp32" and e2e > 0
    shares = report["data_path_overhead_repeats"]  # one per back-to-back pair of step and end to end
    # --quick: 2 repeats; each 1 - step / end to end, below 1 (times are positive), at any load
    assert len(shares) == 2 and all(math.isfinite(s) and s < 1 for s in shares)
    assert report["data_path_overhead"] == pytest.approx(statistics.median(shares))
    data_s, step_s = report["data_path_ms_per_batch"] / 1e3, 8 / steps["fp32"]
    assert 0 < data_s and report["data_path_share_alone"] == pytest.approx(data_s / (data_s + step_s))
    paths = report["data_path_images_per_s"]
    assert paths["in_memory"] == pytest.approx(8 / data_s)
    assert paths["streaming"] is None if not os.path.isdir(CIFAR_JPG) else paths["streaming"] > 0

    for v, ips in steps.items():
        expected = None if ips is None else report["flops_per_image"] * ips / 1e12
        assert report["tflops"][v] == pytest.approx(expected)
    assert report["peak_fraction"] is None and report["peak_memory_bytes"] is None  # CPU
    assert report["max_rss_bytes"] > 100 * 2**20, "RSS in KiB taken for bytes? torch alone takes more"


def test_flops_per_image_are_one_full_byol_step(report):
    """A step is, per image and view, the online network forward (1x) and backward (2x) plus the
    target forward (1x): 4 encoder passes x 2 views = 8x the encoder's forward FLOPs (the MLPs add
    under 1%). Counting only the forward (4x), one view (4x) or one pass (1x) falls outside."""
    encoder, _ = resnet("resnet18", 32)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        encoder(torch.zeros(2, 3, 32, 32))
    forward = counter.get_total_flops() / 2
    assert 1.0e9 < forward < 1.3e9  # CIFAR ResNet-18: ~0.56 G multiply-adds per 32 px image
    assert 7.5 * forward < report["flops_per_image"] < 8.5 * forward


HUGE = str(10**12)
BAD = [("--arch", "bogus")] + [(flag, value) for flag in ("--repeats", "--steps", "--images", "--batch-size",
                                                           "--hidden-dim", "--image-size", "--peak-tflops")
                               for value in ("0", "-1", "nan", "inf", HUGE)] + \
      [(flag, value) for flag in ("--warmup", "--workers") for value in ("-1", "nan", "inf", HUGE)]


@pytest.mark.parametrize("flag, value", BAD)
def test_every_numeric_flag_and_the_arch_are_checked_before_any_work(flag, value, capsys):
    """--repeats 0 (median of nothing), --steps 0 (a division by zero) and --arch bogus were tracebacks after
    minutes of work; 10**12 images, workers or steps would exhaust the machine. Now each is a usage error."""
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--device", "cpu", f"{flag}={value}"])
    assert e.value.code == 2 and flag in capsys.readouterr().err


def test_images_that_would_fill_the_memory_are_refused_before_loading():
    with pytest.raises(SystemExit, match="--images 10000000 at 1024 px would fill"):
        bench.parse_args(["--device", "cpu", "--images", "10000000", "--image-size", "1024"])


def test_more_images_than_the_folder_holds_is_an_error_not_random_images(image_root):
    """--images beyond the folder used to fall back to random images, with a warning lost in the output:
    the benchmark then measured other data. Random images remain for a --data that holds no ImageFolder."""
    args = bench.parse_args(["--device", "cpu", "--quick", "--data", str(image_root / "train"), "--images", "65"])
    with pytest.raises(SystemExit, match="--images 65 is more than the 64 images"):
        bench.load_images(args)
    args.images = 64
    assert "real images" in bench.load_images(args)[1]
    args.data = str(image_root / "nowhere")
    assert "RANDOM" in bench.load_images(args)[1]


def test_compile_without_a_compiler_is_a_message_before_any_work(monkeypatch):
    from machinery import devices
    monkeypatch.setattr(devices.shutil, "which", lambda name: None)
    with pytest.raises(SystemExit, match="compiler"):
        bench.parse_args(["--device", "cpu", "--compile"])
