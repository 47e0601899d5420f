import importlib

import pytest

from benchmarks.readme import markdown_table, replace_section


def test_replace_section_rewrites_only_between_markers(tmp_path):
    path = tmp_path / "README.md"
    path.write_text("intro\n<!-- t:start -->\nold\n<!-- t:end -->\noutro\n")
    replace_section("t", markdown_table(["a", "b"], [[1, 2]]), path=str(path))
    assert path.read_text() == (
        "intro\n<!-- t:start -->\n| a | b |\n|---|---|\n| 1 | 2 |\n<!-- t:end -->\noutro\n")


def test_replace_section_keeps_the_file_mode(tmp_path):
    path = tmp_path / "README.md"
    path.write_text("<!-- t:start -->\n<!-- t:end -->\n")
    path.chmod(0o644)
    replace_section("t", "x", path=str(path))
    assert path.stat().st_mode & 0o777 == 0o644


def test_replace_section_needs_markers(tmp_path):
    path = tmp_path / "README.md"
    path.write_text("no markers\n")
    with pytest.raises(ValueError, match="<!-- t:start -->"):
        replace_section("t", "x", path=str(path))
    assert path.read_text() == "no markers\n"


@pytest.mark.parametrize("module,page,name", [
    ("benchmarks.readme", "README", "accuracy_headline"),
    ("benchmarks.accuracy", "EVIDENCE", "accuracy"),
    ("benchmarks.accuracy", "EVIDENCE", "depth_sweep"),
    ("benchmarks.accuracy", "EVIDENCE", "converged"),
    ("benchmarks.layer", "DOCS_PAGE", "layer"),
    ("benchmarks.model", "DOCS_PAGE", "model"),
    ("benchmarks.models", "DOCS_PAGE", "models"),
    ("benchmarks.plan", "DOCS_PAGE", "plan"),
    ("benchmarks.convert_coverage", "DOCS_PAGE", "convert_coverage"),
])
def test_each_script_writes_the_page_that_holds_its_table(module, page, name):
    text = open(getattr(importlib.import_module(module), page)).read()
    assert text.count(f"<!-- {name}:start -->") == 1 and text.count(f"<!-- {name}:end -->") == 1
