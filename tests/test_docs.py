"""The docs cannot drift from the code: the README's stage table is the registry's, docs/config.md is what
the schema generates, every relative link resolves, and the README stays short enough to read in ten minutes.

    .venv/bin/python -m pytest tests/test_docs.py -q
"""

from __future__ import annotations

import re
from pathlib import Path

from popflow.config import reference as config_reference

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", REPO / "BENCHMARKS.md", *sorted((REPO / "docs").glob("*.md"))]


def table_after(text: str, heading: str) -> list[list[str]]:
    """The cells of the first markdown table under `heading` (header and separator rows left out)."""
    section = text.split(heading, 1)[1]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    block = []
    for line in section.splitlines()[section.splitlines().index(rows[0]):]:
        if not line.startswith("|"):
            break
        block.append([cell.strip() for cell in line.strip("|").split("|")])
    return block[2:]


def test_the_readme_lists_the_registry_stages_in_order():
    from flows.pipeline import STAGES

    rows = table_after((REPO / "README.md").read_text(), "## The stages")
    assert [r[0] for r in rows] == [s.name for s in STAGES]
    modules = {s.name: s.work.__module__.replace(".", "/") + ".py" for s in STAGES}
    writes = {s.name: set(s.writes) for s in STAGES}
    for name, module, written, *_ in rows:
        assert module.strip("`") == modules[name], name
        assert set(re.findall(r"`([a-z_]+)`", written)) == writes[name], name


def test_the_config_reference_is_up_to_date():
    """Regenerate with `.venv/bin/python -m popflow.config.reference > docs/config.md`."""
    assert (REPO / "docs/config.md").read_text() == config_reference.render()


def test_the_config_reference_spells_a_key_as_the_schema_has_it():
    """sample.n: an int, default 8, at least 2 (SampleConfig); prompts.eval_fraction: >= 0.0, < 1.0; a
    discriminated union gets one section per kind."""
    text = config_reference.render()
    assert "| `n` | int | `8` | >= 2 | Samples per prompt" in text
    assert "| `eval_fraction` | float | `0.1` | >= 0.0, < 1.0 |" in text
    for kind in ("hf", "constraints", "relevance", "python"):
        assert f"## `score.models[] (kind: {kind})`" in text


def test_every_relative_link_resolves():
    """Links in the text, not in fenced code (docs/export.md quotes a dataset card whose links are the card's)."""
    for page in PAGES:
        text = re.sub(r"(?ms)^(`{3,})[^\n]*\n.*?^\1\s*$", "", page.read_text())
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.relative_to(REPO)} links to missing {target}"


def test_the_readme_reads_in_ten_minutes():
    assert len((REPO / "README.md").read_text().splitlines()) <= 300


def test_docs_lake_names_every_table_a_stage_writes():
    from flows.pipeline import STAGES

    rows = table_after((REPO / "docs/lake.md").read_text(), "a view per table over all runs")
    documented = {name for r in rows for name in re.findall(r"`([a-z_]+)`", r[0])}
    written = {table for s in STAGES for table in s.writes} | {"comparison", "pop_sweep"}
    assert written <= documented, sorted(written - documented)


def test_no_symlink_is_tracked():
    """A worktree's `.venv` or `data/models` link once slipped past `.gitignore` (its `dir/` patterns match only
    folders) and its commit replaced main's real folders on checkout: git must track no symlink."""
    import subprocess

    import pytest

    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout (an exported tree)")
    staged = subprocess.run(["git", "ls-files", "-s"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    links = [line.split("\t", 1)[1] for line in staged.splitlines() if line.startswith("120000 ")]
    assert not links, f"symlinks tracked by git: {links}"
