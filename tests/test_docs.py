"""The front door and the pages behind it: a short README that links every docs/ page, links that
lead somewhere, no path of one developer's machine, and no Python snippet that no test runs.
Reads files only; nothing is imported or run."""

from __future__ import annotations

import re

from conftest import ROOT

README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
TEXTS = [README, *PAGES]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# a developer's box, not the project: /work/..., /home/..., /root/..., the bench's /tmp/sftkit...
MACHINE_PATH = re.compile(r"(?<![\w.~$-])/(?:work|home|root)/|/tmp/sftkit")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", "")).replace(" ", "-")


def anchors(path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.DOTALL)  # a `# comment` in a block is no heading
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text, re.MULTILINE)}


def test_readme_is_short():
    assert len(README.read_text().splitlines()) <= 260, "README.md is the front door: move detail to docs/"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / t.split("#")[0]).resolve() for t in LINK.findall(README.read_text())}
    assert PAGES
    assert not [p.name for p in PAGES if p.resolve() not in linked]


def test_relative_links_lead_to_files_and_headings():
    broken = []
    for path in TEXTS:
        for target in LINK.findall(path.read_text()):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if not dest.exists() or (anchor and dest.suffix == ".md" and anchor not in anchors(dest)):
                broken.append(f"{path.name}: {target}")
    assert not broken, f"links to nothing: {broken}"


def test_no_machine_paths():
    found = [f"{p.name}: {ln}" for p in TEXTS for ln in p.read_text().splitlines() if MACHINE_PATH.search(ln)]
    assert not found, f"paths of one machine: {found}"


def test_python_snippets_live_where_a_test_runs_them():
    """tests/test_api.py runs docs/python-api.md's ```python blocks; one elsewhere would go untested."""
    stray = [p.name for p in TEXTS if p.name != "python-api.md" and "```python" in p.read_text()]
    assert not stray


def test_readme_plan_table_is_what_plan_computes():
    """The README's plans for Qwen3-8B and Qwen3.5-9B are bench/plan_table.py's output for this code."""
    from bench.plan_table import table

    assert table() in README.read_text(), "README.md's plan table is stale: run python -m bench.plan_table"
