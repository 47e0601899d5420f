"""Write generated tables into README.md and the docs/ pages between named markers.

A table lives between `<!-- NAME:start -->` and `<!-- NAME:end -->`; the scripts that
measure or compute it rewrite only that span, so the prose around it stays hand-written.
"""
import os

from train import files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def replace_section(name, text, path=README):
    """Replace the span between NAME's markers with `text`; the markers must exist once."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    with open(path) as f:
        readme = f.read()
    if readme.count(start) != 1 or readme.count(end) != 1:
        raise ValueError(f"{path} must hold the markers {start} and {end} exactly once")
    head, rest = readme.split(start)
    _, tail = rest.split(end)
    updated = f"{head}{start}\n{text.strip()}\n{end}{tail}"
    # an interrupted run never leaves a half-written page; the page keeps its mode
    files.write_atomically(path, lambda f: f.write(updated), mode=os.stat(path).st_mode & 0o777)
