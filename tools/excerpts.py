"""The code excerpts in docs/*.md, written from the source so that they cannot go stale.

    python tools/excerpts.py            # rewrite every excerpt in docs/*.md from the source
    python tools/excerpts.py --check    # exit 1, naming each excerpt that differs from the source
    python tools/excerpts.py docs/method.md --check

An excerpt in a document is a marked block; the tool writes what lies between the two markers:

    <!-- excerpt: loss.py:regression_loss -->
    [`loss.py:5-15`](../loss.py#L5-L15)        (the source's file and lines, a link)
    ```python
    def regression_loss(q, z):  ...            (the source, dedented)
    ```
    <!-- /excerpt -->

What follows "excerpt:" is FILE:NAME[:PART]. NAME is a top-level function, class or assignment (augment.py:VIEWS)
or a method (models.py:BYOL.update_target), found with ast, with its decorators and the comment lines directly
above it. PART takes one statement of it instead: a statement kind (while, for, with, if, try, return, assert) or
a name it assigns (peak_lr), the first one in source order; A..B runs from statement A to statement B
(train.py:main:total_steps..peak_lr). The source files carry no markers.
"""
import argparse
import ast
import os
import re
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK = re.compile(r"^<!-- excerpt: (?P<spec>\S+) -->\n(?P<body>.*?)^<!-- /excerpt -->$", re.M | re.S)
OPEN = re.compile(r"^<!-- excerpt: (\S+) -->$", re.M)
KINDS = {"while": ast.While, "for": ast.For, "with": ast.With, "if": ast.If, "try": ast.Try, "return": ast.Return,
         "assert": ast.Assert}


class ExcerptError(Exception):
    """A selector that names no code: an unknown file, name or part."""


def _assigned(node):
    """The names a statement assigns (x = ..., x: T = ..., x += ...)."""
    targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
    return {n.id for t in targets if t is not None for n in ast.walk(t) if isinstance(n, ast.Name)}


def _definition(tree, name):
    """The top-level function, class or assignment called name, or Class.method."""
    scope, *rest = name.split(".")
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == scope:
            break
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and scope in _assigned(node):
            break
    else:
        return None
    for part in rest:
        node = next((n for n in getattr(node, "body", []) if getattr(n, "name", None) == part), None)
        if node is None:
            return None
    return node


def _statement(node, part, after=0):
    """The first statement inside node, in source order and from line `after` on, that is of kind `part`
    (KINDS) or assigns the name `part`."""
    stmts = sorted((n for n in ast.walk(node) if isinstance(n, ast.stmt) and n is not node and n.lineno >= after),
                   key=lambda n: (n.lineno, n.col_offset))
    if part in KINDS:
        return next((n for n in stmts if isinstance(n, KINDS[part])), None)
    return next((n for n in stmts if isinstance(n, (ast.Assign, ast.AnnAssign, ast.AugAssign))
                 and part in _assigned(n)), None)


def locate(spec, root=ROOT):
    """FILE:NAME[:PART] -> (path relative to root, first line, last line, the code, dedented). Lines count
    from 1 and include the decorators and the comment lines directly above."""
    path, _, rest = spec.partition(":")
    name, _, part = rest.partition(":")
    file = os.path.join(root, path)
    if not path.endswith(".py") or not name or not os.path.isfile(file):
        raise ExcerptError(f"{spec}: expected FILE.py:NAME[:PART] with FILE.py in the project"
                           + ("" if os.path.isfile(file) else f" (no file {path})"))
    source = open(file, encoding="utf-8").read()
    lines = source.splitlines()
    node = _definition(ast.parse(source), name)
    if node is None:
        raise ExcerptError(f"{spec}: no top-level function, class or assignment (or Class.method) named {name} "
                           f"in {path}")
    if part:
        first_part, _, last_part = part.partition("..")
        start = _statement(node, first_part)
        end = _statement(node, last_part, after=start.lineno) if start and last_part else start
        if start is None or end is None:
            raise ExcerptError(f"{spec}: no statement {part!r} in {path}:{name} (a kind: {', '.join(KINDS)}, or a "
                               f"name it assigns; A..B for a range)")
        node, last = start, max(end.end_lineno, start.end_lineno)
    else:
        last = node.end_lineno
    first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    while first > 1 and lines[first - 2].strip().startswith("#"):   # the comment directly above
        first -= 1
    return path, first, last, textwrap.dedent("\n".join(lines[first - 1:last]))


def render(spec, doc, root=ROOT):
    """The text between an excerpt's markers, for a document at path doc."""
    path, first, last, code = locate(spec, root)
    link = os.path.relpath(os.path.join(root, path), os.path.dirname(os.path.abspath(doc))).replace(os.sep, "/")
    fence = "````" if "```" in code else "```"
    return f"[`{path}:{first}-{last}`]({link}#L{first}-L{last})\n{fence}python\n{code}\n{fence}\n"


def update(doc, root=ROOT):
    """(the document with every excerpt written from the source, problems): a problem names the document's
    line, the selector and what is wrong."""
    text = open(doc, encoding="utf-8").read()
    problems, out, at = [], [], 0
    opened = [m.start() for m in OPEN.finditer(text)]
    for m in BLOCK.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        try:
            body = render(m["spec"], doc, root)
        except ExcerptError as e:
            problems.append(f"{doc}:{line}: excerpt {e}")
            body = m["body"]
        if body != m["body"]:
            problems.append(f"{doc}:{line}: excerpt {m['spec']} differs from the source")
        out += [text[at:m.start("body")], body]
        at = m.end("body")
        opened.remove(m.start())
    for start in opened:
        problems.append(f"{doc}:{text.count(chr(10), 0, start) + 1}: excerpt marker without <!-- /excerpt --> "
                        f"(or with another excerpt inside)")
    return "".join(out) + text[at:], problems


def specs(doc):
    """The selectors of a document's excerpts, in order."""
    return OPEN.findall(open(doc, encoding="utf-8").read())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("docs", nargs="*", help="Markdown files (default: every docs/*.md)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 when an excerpt differs from the "
                                                        "source or names no code")
    args = p.parse_args(argv)
    docs = args.docs or sorted(os.path.join(ROOT, "docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
                               if f.endswith(".md"))
    failed = False
    for doc in docs:
        if not os.path.isfile(doc):
            raise SystemExit(f"error: no file {doc}")
        text, problems = update(doc, ROOT)
        unknown = [q for q in problems if "differs from the source" not in q]
        if args.check:
            for q in problems:
                print(q, file=sys.stderr)
            failed |= bool(problems)
        else:
            for q in unknown:
                print(q, file=sys.stderr)
            failed |= bool(unknown)
            if text != open(doc, encoding="utf-8").read():
                with open(doc, "w", encoding="utf-8") as f:
                    f.write(text)
                print(f"rewrote {os.path.relpath(doc)}: {len(problems) - len(unknown)} excerpt(s)")
    if failed and args.check:
        print("run: python tools/excerpts.py", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
