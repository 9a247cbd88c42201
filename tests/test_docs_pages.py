"""What keeps the documentation honest, checked without running its examples (tests/test_docs_examples.py runs
them): the example markers are well formed, no block is tagged with a language that looks runnable but is not
run (`py`, `sh`), at least MIN_EXAMPLES examples run, every docs page is linked from README.md, and every
relative link and anchor exists."""

from __future__ import annotations

from tests.support import ROOT
from tests.support import doc_examples as docs

BLOCKS, PROBLEMS = docs.collect(ROOT)
EXAMPLES = [b for b in BLOCKS if b.runnable]
MIN_EXAMPLES = 10
"""The fewest blocks that actually run (python or bash, not compile-only) across README.md and docs/."""


def test_markers_and_fences_are_well_formed():
    assert not PROBLEMS, "\n".join(map(str, PROBLEMS))


def test_runnable_languages_are_spelled_python_or_bash():
    problems = docs.alias_problems(BLOCKS)
    assert not problems, "\n".join(map(str, problems))


def test_there_are_enough_examples_that_run():
    ran = [b.id for b in EXAMPLES if b.compile_only is None]
    assert len(ran) >= MIN_EXAMPLES, (
        f"only {len(ran)} python/bash blocks that run (not compile-only) in README.md and docs/*.md, "
        f"at least {MIN_EXAMPLES} expected: {ran}")


def test_every_docs_page_is_linked_from_the_readme():
    linked = docs.linked_pages(ROOT, ROOT / "README.md")
    missing = [docs.rel(p, ROOT) for p in docs.docs_pages(ROOT) if p not in linked]
    assert not missing, f"README.md links to none of: {missing}"


def test_relative_links_and_anchors_exist():
    broken = docs.broken_links(ROOT, docs.doc_files(ROOT))
    assert not broken, "\n".join(broken)
