"""tests/support/doc_examples.py on small literal pages: which blocks it finds, with which line, language, source and
marker, what it reports, and how it reads links and anchors. In-process and fast (the examples themselves run
in tests/test_docs_examples.py)."""

from __future__ import annotations

import textwrap

from tests.support import doc_examples as docs


def page(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def test_backtick_and_tilde_fences_with_their_language_line_and_source():
    blocks, problems = docs.parse(page("""
        # Title

        ```python
        print("hi")
        ```

        ~~~bash
        echo hi
        ~~~

        ```text
        output
        ```

        ```
        no language
        ```
    """), "docs/x.md")
    assert problems == []
    assert [(b.line, b.language, b.source) for b in blocks] == [
        (3, "python", 'print("hi")\n'), (7, "bash", "echo hi\n"), (11, "text", "output\n"), (15, "", "no language\n")]
    assert [b.id for b in blocks if b.runnable] == ["docs/x.md:3", "docs/x.md:7"]
    assert all(b.compile_only is None and b.error is None for b in blocks)


def test_the_language_is_the_first_word_of_the_info_string_lowercased():
    blocks, _ = docs.parse("``` Python title=\"x.py\"\npass\n```\n~~~   bash {.sh}\ntrue\n~~~\n")
    assert [b.language for b in blocks] == ["python", "bash"]


def test_a_longer_fence_holds_shorter_ones_and_the_other_character():
    blocks, problems = docs.parse(page("""
        ````markdown
        ```python
        not an example: inside another block
        ```
        ~~~
        ````
        ~~~~bash
        ~~~
        echo still inside
        ~~~~
    """))
    assert problems == []
    assert [(b.line, b.language) for b in blocks] == [(1, "markdown"), (7, "bash")]
    assert blocks[0].source == "```python\nnot an example: inside another block\n```\n~~~\n"
    assert blocks[1].source == "~~~\necho still inside\n"


def test_a_backtick_fence_whose_info_has_a_backtick_is_not_a_fence():
    blocks, problems = docs.parse("```python `x`\n")
    assert blocks == [] and problems == []


def test_an_indented_fence_in_a_list_loses_its_indentation():
    blocks, problems = docs.parse(page("""
        1. Install:

           ```bash
           pip install -e .
             indented more
           ```
        2. Then:
            ~~~python
            x = 1
            ~~~
    """))
    assert problems == []
    assert [(b.line, b.language, b.source) for b in blocks] == [
        (3, "bash", "pip install -e .\n  indented more\n"), (8, "python", "x = 1\n")]


def test_a_compile_only_marker_right_before_the_fence_gives_its_reason():
    blocks, problems = docs.parse(page("""
        <!-- example: compile-only (needs a GPU) -->
        ```python
        import torch
        ```
          <!--   example:compile-only( several machines (Slurm) )   -->
          ```bash
          sbatch launch/slurm.sbatch
          ```
    """))
    assert problems == []
    assert [(b.line, b.compile_only) for b in blocks] == [(2, "needs a GPU"), (6, "several machines (Slurm)")]


def test_a_marker_without_a_reason_is_the_blocks_error():
    blocks, problems = docs.parse("<!-- example: compile-only -->\n```python\npass\n```\n"
                                  "<!-- example: compile-only () -->\n```bash\ntrue\n```\n", "README.md")
    assert problems == []
    assert [b.compile_only for b in blocks] == [None, None]
    assert "malformed example marker" in blocks[0].error and "(REASON)" in blocks[0].error
    assert "without a reason" in blocks[1].error


def test_a_marker_separated_from_its_fence_is_a_problem_and_the_block_runs():
    blocks, problems = docs.parse("<!-- example: compile-only (GPU) -->\n\n```python\npass\n```\n", "README.md")
    assert [(b.compile_only, b.error) for b in blocks] == [(None, None)]
    assert [(p.line, "not immediately followed" in p.message) for p in problems] == [(1, True)]
    assert str(problems[0]).startswith("README.md:1: ")


def test_markers_that_lead_nowhere_are_problems():
    text = page("""
        <!-- example: compile-only (GPU) -->
        ```yaml
        a: 1
        ```
        <!-- example: compile-only -->
        ```text
        out
        ```
        <!-- example: run -->
        Some prose.
        <!-- example: compile-only (at the end) -->
    """)
    blocks, problems = docs.parse(text)
    assert [b.compile_only for b in blocks] == [None, None]
    assert [p.line for p in problems] == [1, 5, 9, 11]
    assert "in front of a yaml block" in problems[0].message
    assert "malformed" in problems[1].message and "malformed" in problems[2].message
    assert "end of the page" in problems[3].message


def test_a_marker_inside_a_block_is_content_and_other_comments_are_prose():
    blocks, problems = docs.parse(page("""
        <!-- a comment -->
        ```text
        <!-- example: compile-only (REASON) -->
        ```
        ```python
        pass
        ```
    """))
    assert problems == []
    assert [(b.line, b.compile_only) for b in blocks] == [(2, None), (5, None)]


def test_an_unclosed_fence_runs_to_the_end_and_is_a_problem():
    blocks, problems = docs.parse("text\n```python\nx = 1\n", "docs/y.md")
    assert [(b.line, b.source) for b in blocks] == [(2, "x = 1\n")]
    assert [str(p) for p in problems] == ["docs/y.md:2: the ``` fence opened here is never closed"]


def test_line_numbers_in_an_error_are_the_pages(tmp_path):
    blocks, _ = docs.parse("# t\n\n<!-- example: compile-only (x) -->\n```python\nok = 1\nprint((ok)\n```\n",
                           "README.md")
    outcome = docs.check(blocks[0], tmp_path, tmp_path)  # compile-only python: compile() in-process
    assert outcome.returncode == 1 and "line 6" in outcome.stderr
    assert "README.md:4" in docs.report(blocks[0], outcome)
    assert docs.numbered_source(blocks[0]).splitlines()[5] == "print((ok)"
    assert docs.script_name(docs.Block("docs/fine-tune.md", 12, "python", "")) == "fine_tune_12.py"


def test_alias_languages_are_reported():
    blocks, _ = docs.parse("```sh\nls\n```\n```py\npass\n```\n```console\n$ ls\n```\n```pycon\n>>> 1\n```\n", "a.md")
    assert [str(p) for p in docs.alias_problems(blocks)] == [
        "a.md:1: a 'sh' block is not run: tag it 'bash' (an example) or 'text' (output or a sketch)",
        "a.md:4: a 'py' block is not run: tag it 'python' (an example) or 'text' (output or a sketch)"]


def test_slugs_follow_github():
    assert docs.slug("Two commands") == "two-commands"
    assert docs.slug("EMA weights, the best checkpoint, and exports others load") == \
        "ema-weights-the-best-checkpoint-and-exports-others-load"
    assert docs.slug("The `Engine(...)`: fp16 & the GradScaler") == "the-engine-fp16--the-gradscaler"
    assert docs.slug("snake_case and dash-case 2.0") == "snake_case-and-dash-case-20"
    assert docs.slug("See [the docs](docs/x.md) <sup>1</sup>") == "see-the-docs-1"


def test_anchors_of_a_page():
    text = page("""
        # Title
        ## Setup ##
        ## Setup
        #not a heading
        <a name="custom"></a>
        ```bash
        # a comment, not a heading
        ```
        ### C#
        ### `async_save`: saving in the background
        Not a heading: `# x`
    """)
    assert docs.anchors(text) == {"title", "setup", "setup-1", "custom", "c", "async_save-saving-in-the-background"}


def test_links_outside_code_without_a_scheme():
    text = page("""
        See [the engine](docs/engine.md#the-loop), ![plot](img/a.png "title") and
        [a link that
        spans lines](<docs/with space.md>), [web](https://x.org), [mail](mailto:a@b.c), [top](#title).
        `[not a link](nowhere.md)` and
        ```text
        [not a link](nowhere.md)
        ```
        <!-- [commented](nowhere.md) -->
        [ref]: launch/README.md
    """)
    assert docs.links(text) == [(1, "docs/engine.md#the-loop"), (1, "img/a.png"), (2, "docs/with space.md"),
                                (3, "#title"), (9, "launch/README.md")]


def test_broken_links_and_linked_pages(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "launch").mkdir()
    (tmp_path / "README.md").write_text(page("""
        # Top
        [ok](docs/a.md) [ok](docs/a.md#setup) [ok](launch/) [ok](#top) [ok](/docs/a.md)
        [bad](docs/missing.md) [bad](docs/a.md#nope) [bad](#nope) [bad](../outside.md)
    """))
    (tmp_path / "docs" / "a.md").write_text("## Setup\n[back](../README.md#top) [also](b.md)\n")
    (tmp_path / "docs" / "b.md").write_text("# B\n")
    assert docs.doc_files(tmp_path) == [tmp_path / "README.md", tmp_path / "docs" / "a.md", tmp_path / "docs" / "b.md"]
    assert docs.broken_links(tmp_path, docs.doc_files(tmp_path)) == [
        "README.md:3: link (docs/missing.md): docs/missing.md does not exist",
        "README.md:3: link (docs/a.md#nope): docs/a.md has no heading with the anchor #nope",
        "README.md:3: link (#nope): README.md has no heading with the anchor #nope",
        "README.md:3: link (../outside.md) points outside the repository"]
    linked = docs.linked_pages(tmp_path, tmp_path / "README.md")
    assert tmp_path / "docs" / "a.md" in linked and tmp_path / "docs" / "b.md" not in linked
