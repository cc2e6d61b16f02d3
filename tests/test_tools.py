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
