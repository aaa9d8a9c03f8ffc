"""The README and docs/ cannot drift from the results: figures reach docs/ only through
``benchmarks/report.py``, the README stays a product page, and every link leads somewhere."""

from __future__ import annotations

import os
import re
from pathlib import Path

from conftest import load_benchmark

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
report = load_benchmark("report")

# seven or more hex digits, with at least one digit and one letter: what a commit looks like
COMMIT = re.compile(r"\b(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
PENDING = {"docs/deployment.md"}
"""Pages linked to that a parallel change writes (the two-machine deployment walk-through)."""


def test_docs_benchmarks_is_what_the_generator_makes_of_the_committed_results() -> None:
    committed = (ROOT / "docs" / "benchmarks.md").read_text()
    assert committed == report.render(), "docs/benchmarks.md is stale: python benchmarks/report.py"


def test_the_readme_headline_table_is_the_generators() -> None:
    assert report.headline_table() in README.read_text()


def test_the_readme_is_a_page_not_a_notebook() -> None:
    assert len(README.read_text().splitlines()) <= 150


def test_no_commit_hash_outside_the_benchmark_headers() -> None:
    found = []
    for page in [README, *DOCS]:
        for number, line in enumerate(page.read_text().splitlines(), 1):
            if page.name == "benchmarks.md" and line.startswith("- commit: "):
                continue  # a results file's header says where it was measured
            found += [f"{page.relative_to(ROOT)}:{number}: {m}" for m in COMMIT.findall(line)]
    assert found == []


def test_the_commit_pattern_finds_hashes_and_nothing_else() -> None:
    assert COMMIT.findall("fixed in 058b1da, see 5bef8bf0a1") == ["058b1da", "5bef8bf0a1"]
    assert COMMIT.findall("3717120 bytes, decoded 1e-3, a deadbeef-free facade") == []


def test_every_relative_link_leads_to_a_file() -> None:
    broken = []
    for page in [README, *DOCS, *ROOT.glob("*/README.md")]:
        for target in LINK.findall(page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            path = (page.parent / target).resolve()
            if not path.exists() and os.path.relpath(path, ROOT) not in PENDING:
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert broken == []
