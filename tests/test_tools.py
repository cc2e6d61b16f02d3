"""tools/: every tool answers --help from the project's root, as a fresh clone runs it, and every script path
that the README and docs/ tell a reader to run exists."""
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

TOOLS = sorted(f for f in os.listdir(os.path.join(ROOT, "tools")) if f.endswith((".py", ".sh")))


def test_the_readme_names_every_tool():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert len(TOOLS) >= 6 and not [tool for tool in TOOLS if tool not in readme]


@pytest.mark.parametrize("tool", TOOLS)
def test_every_tool_answers_help_from_the_root(tool):
    """`python tools/X.py --help` or `tools/X.sh --help`: exit 0, its own usage, nothing written."""
    before = set(os.listdir(ROOT))
    command = [sys.executable] if tool.endswith(".py") else ["bash"]
    r = subprocess.run([*command, os.path.join("tools", tool), "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert ("usage:" in r.stdout) if tool.endswith(".py") else (f"tools/{tool}" in r.stdout), r.stdout
    assert "Traceback" not in r.stderr
    assert set(os.listdir(ROOT)) == before                      # --help makes no folder or file


def _commands():
    """(document, path) for every `python PATH`, `torchrun ... PATH` and `tools/X` a document tells a reader to run."""
    docs = ["README.md"] + [os.path.join("docs", f) for f in sorted(os.listdir(os.path.join(ROOT, "docs")))
                            if f.endswith(".md")]
    for doc in docs:
        text = open(os.path.join(ROOT, doc), encoding="utf-8").read()
        for path in re.findall(r"(?:python|torchrun[^`\n]*?)\s+((?:tools/)?[\w/]+\.py)\b", text):
            yield doc, path
        for path in re.findall(r"(?<![\w/.])(tools/\w+\.(?:py|sh))", text):
            yield doc, path


def test_every_script_the_docs_run_exists():
    found = sorted(set(_commands()))
    assert len({path for _, path in found}) >= 6                # train, test and the tools at least
    missing = [f"{doc}: {path}" for doc, path in found if not os.path.isfile(os.path.join(ROOT, path))]
    assert not missing, missing


def test_the_gpu_calls_summary_reads_what_a_call_left(tmp_path):
    """`tools/gpu_check.sh summary DIR` on the files a lease leaves: a graph check that failed, a bench and a
    bench killed at its limit, a run whose log ends in a line cut short, and that run's folder packed into
    files.tgz (the device tool returns 8 files). The figures for the README's results row and docs/speed.md
    come out as written, and a stage without a result is said so, not a traceback."""
    import json
    import tarfile
    (tmp_path / "gpu.txt").write_text("name, memory.total [MiB], driver_version\nNVIDIA H200, 143771 MiB, 580\n")
    checks = {"two replays draw different views": True, "300 graph steps track the eager loss curve": False}
    (tmp_path / "graph_check.txt").write_text("PASS  ...\n" + json.dumps(dict(
        replay_vs_eager_relative=0.004, loss_curve_max_gap=0.2, loss_eager_first_last=[8.0, 2.5],
        loss_graph_first_last=[8.0, 4.0], checks=checks, all_hold=False)) + "\nFAILED (exit 1): python tools/"
        "graph_check.py\nstage took 41 s\n")
    (tmp_path / "bench-256.txt").write_text("a table\n" + json.dumps(dict(
        step_images_per_s=dict(fp32=7589.9, bf16=9295.8, compile=None), end_to_end_images_per_s=7177.0,
        graph_images_per_s=dict(graph=15000.4))) + "\nstage took 50 s\n")
    (tmp_path / "bench-512.txt").write_text("FAILED (exit 124, past its 90 s): python tools/bench.py\nstage took 90 s\n")
    run = tmp_path / "packed" / "headline"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(dict(minutes=6.28, cuda_graph=False, batch_size=256, epochs=50,
                                                     planned_minutes=6.1, train_minutes=5.9)))
    (run / "log.jsonl").write_text(
        json.dumps(dict(epoch=49.5, images_per_s=6000.0, loss=0.7)) + "\n" + json.dumps(dict(
            epoch=50.0, images_per_s=8000.0, loss=0.6, knn_top1=0.75, probe_test_top1=0.5616)) + '\n{"epoch": 5')
    (run / "eval.json").write_text(json.dumps(dict(top1=0.8123, top5=0.99, knn_top1=0.76)))
    with tarfile.open(tmp_path / "files.tgz", "w:gz") as t:
        t.add(run, "headline")
    r = subprocess.run(["bash", os.path.join("tools", "gpu_check.sh"), "summary", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "gpu: NVIDIA H200, 143771 MiB, 580"
    assert lines[1] == "stages: bench-256 50 s; bench-512 90 s (exit 124, past its 90 s); graph_check 41 s (exit 1)"
    assert lines[2].startswith("graph check: FAILED: 300 graph steps track the eager loss curve |")
    assert "loss_curve_max_gap 0.2" in lines[2] and "graph 8.000 -> 4.000" in lines[2]
    assert lines[3] == "bench-256: step fp32 7,590, bf16 9,296; end to end eager 7,177, graph 15,000"
    assert lines[4] == "bench-512: no result"
    assert lines[5].startswith("headline: train.py --minutes 6.28 (batch 256): 50 epochs, planned 6.10 min, "
                               "trained 5.90 min, median 8,000 images/s, last loss 0.6000 | test.py: linear 81.23% "
                               "(top-5 99.00%), kNN 76.00% | train.py's last check (epoch 50): kNN 75.00%, online "
                               "probe 56.16%"), lines[5]
