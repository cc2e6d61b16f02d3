"""tools/excerpts.py: the code quoted in docs/method.md and docs/method.zh.md is the source as it is now, and the
checker catches an excerpt that is not (on a copy, never the real docs)."""
import os
import shutil

import pytest

from tests.conftest import ROOT
from tools import excerpts

DOCS = [os.path.join(ROOT, "docs", name) for name in ("method.md", "method.zh.md")]


@pytest.mark.parametrize("doc", DOCS, ids=os.path.basename)
def test_every_excerpt_equals_the_source(doc):
    """Fails naming each FILE:NAME whose block differs: run python tools/excerpts.py to rewrite them."""
    assert len(excerpts.specs(doc)) >= 15
    _, problems = excerpts.update(doc)
    assert not problems, "\n".join(problems) + "\nrun: python tools/excerpts.py"


def test_the_english_and_chinese_walkthroughs_quote_the_same_code():
    english, chinese = (excerpts.specs(doc) for doc in DOCS)
    assert english == chinese


def test_a_part_of_a_function_is_its_statements_with_the_source_lines():
    """train.py:main:while is Algorithm 1's loop, from `while` to its last line, and the lines named are the
    file's own."""
    path, first, last, code = excerpts.locate("train.py:main:while")
    lines = open(os.path.join(ROOT, path), encoding="utf-8").read().splitlines()
    assert code.startswith("while k < total_steps") and lines[first - 1].lstrip().startswith("while ")
    assert code.splitlines()[-1].strip() == lines[last - 1].strip() == "run.save(k)"
    _, first, last, code = excerpts.locate("train.py:main:total_steps..peak_lr")
    assert code.splitlines()[-1].startswith("peak_lr =") and "total_steps =" in code and last - first <= 6


def _project(tmp_path, body):
    """A project of one source file (loss.py, copied) and one document quoting it."""
    shutil.copy(os.path.join(ROOT, "loss.py"), tmp_path / "loss.py")
    (tmp_path / "docs").mkdir()
    doc = tmp_path / "docs" / "page.md"
    doc.write_text(f"# a page\n\n{body}\n\nthe end\n", encoding="utf-8")
    return str(doc)


def test_a_stale_excerpt_is_named_then_rewritten(tmp_path):
    doc = _project(tmp_path, "<!-- excerpt: loss.py:regression_loss -->\n<!-- /excerpt -->")
    text, problems = excerpts.update(doc, root=str(tmp_path))
    assert len(problems) == 1 and "loss.py:regression_loss differs from the source" in problems[0]
    assert "[`loss.py:5-15`](../loss.py#L5-L15)" in text and "return 2 - 2 * (q * z).sum(dim=-1)" in text
    assert text.endswith("<!-- /excerpt -->\n\nthe end\n")             # the rest of the page is left as it was
    open(doc, "w", encoding="utf-8").write(text)
    assert excerpts.update(doc, root=str(tmp_path)) == (text, [])

    source = tmp_path / "loss.py"                                      # the code changes under the page
    source.write_text(source.read_text().replace("2 - 2 *", "2.0 - 2 *"))
    _, problems = excerpts.update(doc, root=str(tmp_path))
    assert len(problems) == 1 and "loss.py:regression_loss differs" in problems[0]
    source.write_text("# one more line\n" + source.read_text())        # the lines move, the code does not
    _, problems = excerpts.update(doc, root=str(tmp_path))
    assert len(problems) == 1 and "loss.py:regression_loss differs" in problems[0]


@pytest.mark.parametrize("spec, says", [("loss.py:nope", "named nope in loss.py"),
                                        ("loss.py:byol_loss:while", "no statement 'while'"),
                                        ("nofile.py:f", "no file nofile.py"),
                                        ("loss.py", "expected FILE.py:NAME")])
def test_an_excerpt_that_names_no_code_is_named(tmp_path, spec, says):
    doc = _project(tmp_path, f"<!-- excerpt: {spec} -->\n<!-- /excerpt -->")
    text, problems = excerpts.update(doc, root=str(tmp_path))
    assert len(problems) == 1 and f"page.md:3: excerpt {spec}" in problems[0] and says in problems[0], problems
    assert text == open(doc, encoding="utf-8").read()


def test_an_unclosed_marker_is_named(tmp_path):
    doc = _project(tmp_path, "<!-- excerpt: loss.py:byol_loss -->\n```python\n```")
    _, problems = excerpts.update(doc, root=str(tmp_path))
    assert len(problems) == 1 and "without <!-- /excerpt -->" in problems[0]


def test_check_exits_1_on_a_stale_page_and_writes_nothing(tmp_path, capsys, monkeypatch):
    doc = _project(tmp_path, "<!-- excerpt: loss.py:byol_loss -->\n<!-- /excerpt -->")
    monkeypatch.setattr(excerpts, "ROOT", str(tmp_path))
    before = open(doc, encoding="utf-8").read()
    assert excerpts.main([doc, "--check"]) == 1
    assert "loss.py:byol_loss differs from the source" in capsys.readouterr().err
    assert open(doc, encoding="utf-8").read() == before
    assert excerpts.main([doc]) == 0 and excerpts.main([doc, "--check"]) == 0
