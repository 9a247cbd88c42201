"""The documentation's examples run as written, and its links lead somewhere.

Every ```python and ```bash block of README.md and docs/*.md is one test, its id the block's page and line
(`README.md:62`, `docs/engine.md:17`): a python block runs as a standalone script, a bash block with
`bash -euo pipefail`, each in a fresh temporary directory; a block after the line
`<!-- example: compile-only (REASON) -->` is only compiled (`compile()`, `bash -n`). The convention and the
runner are in tests/support/doc_examples.py. To run one block: `python -m pytest -q tests/test_docs_examples.py
-k "README.md:62"`.

What keeps the pages honest without running anything (markers, links, anchors) is tests/test_docs_pages.py.
"""

from __future__ import annotations

import pytest

from tests.support import ROOT
from tests.support import doc_examples as docs

pytestmark = pytest.mark.processes

EXAMPLES = [b for b in docs.collect(ROOT)[0] if b.runnable]


@pytest.mark.parametrize("block", EXAMPLES, ids=[b.id for b in EXAMPLES])
def test_example(block: docs.Block, tmp_path):
    if block.error is not None:
        pytest.fail(f"{block.id}: {block.error}", pytrace=False)
    outcome = docs.check(block, tmp_path, ROOT)
    if outcome.returncode != 0:
        pytest.fail(docs.report(block, outcome), pytrace=False)
