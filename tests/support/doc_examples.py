"""The code examples of README.md and docs/*.md: extracting them, running them, and checking the pages' links.

The convention (tests/test_docs_examples.py runs it):

- Every fenced code block (``` or ~~~, also indented inside a list) whose info string starts with `python` or
  `bash` is an example. Other languages (`text`, `yaml`, `console`, `toml`, none) are not collected.
- A `python` block is a standalone script: saved to a file in a fresh temporary directory and run there with
  this Python, the repository first on PYTHONPATH (60 s at most).
- A `bash` block runs as `bash -euo pipefail -c BLOCK` in a fresh temporary directory in which `train.py`,
  `examples/` and `launch/` are symlinks to the repository's, with this Python's bin directory (the venv's
  `python`, `accelerate`, `torchrun`, `acctrain`) first on PATH (120 s at most).
- A block whose fence line is immediately preceded by the line `<!-- example: compile-only (REASON) -->` is only
  checked: Python with `compile()`, bash with `bash -n`. The reason is required.

The script and the bash string start with as many empty lines as precede the block's first line in its page, so
the line numbers in a traceback or a bash error are those of the Markdown file.

Only the standard library is imported here: collecting the tests costs reading a few Markdown files.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

RUNNABLE = ("python", "bash")
"""The languages that are run; every other block is left alone."""
ALIASES = {"py": "python", "python3": "python", "sh": "bash", "shell": "bash", "zsh": "bash"}
"""Languages that look runnable but are not run: `alias_problems` reports them (`text`, `console` and `pycon` are
the tags for output and sessions shown)."""
TIMEOUT_S = {"python": 60, "bash": 120}
LINKED_INTO_BASH_CWD = ("train.py", "examples", "launch")
MARKER_HINT = "<!-- example: compile-only (REASON) -->"

_OPEN = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_CLOSE = re.compile(r"^[ \t]*(?P<fence>`{3,}|~{3,})[ \t]*$")
_MARKER_LIKE = re.compile(r"^<!--\s*example\b", re.IGNORECASE)
_MARKER = re.compile(r"^<!--\s*example:\s*compile-only\s*\((?P<reason>.*)\)\s*-->$")


@dataclass(frozen=True)
class Block:
    """One fenced code block of a Markdown page."""

    file: str
    """The page, relative to the repository root with '/' (`README.md`, `docs/engine.md`)."""
    line: int
    """The 1-based line of the opening fence."""
    language: str
    """The first word of the info string, lowercased ('' without one)."""
    source: str
    """The block's lines (the fence's indentation removed), each ending with a newline."""
    compile_only: str | None = None
    """The reason of a compile-only marker, None without one."""
    error: str | None = None
    """What is wrong with the marker in front of the block, if anything (the test reports it, runs nothing)."""

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}"

    @property
    def runnable(self) -> bool:
        return self.language in RUNNABLE


@dataclass(frozen=True)
class Problem:
    """Something in a page that the convention does not allow: a stray or malformed marker, an unclosed fence."""

    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


def _marker(stripped: str) -> tuple[str | None, str | None]:
    """(reason, error) of a line that looks like an example marker."""
    m = _MARKER.match(stripped)
    if m is None:
        return None, f"malformed example marker {stripped!r}: the form is {MARKER_HINT}, on one line"
    if not m["reason"].strip():
        return None, f"compile-only marker without a reason: write {MARKER_HINT}"
    return m["reason"].strip(), None


def parse(text: str, file: str = "<string>") -> tuple[list[Block], list[Problem]]:
    """Every fenced code block of one Markdown text, and the problems with its example markers and fences.

    A marker counts for the fence on the very next line (no blank line between). Lines inside a fenced block
    are its content, never markers or fences. An unclosed fence runs to the end of the text (CommonMark), and is
    a problem."""
    lines = text.splitlines()
    blocks: list[Block] = []
    problems: list[Problem] = []
    pending: tuple[int, str | None, str | None] | None = None  # (line, reason, error) of the previous line's marker
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        m = _OPEN.match(line)
        if m and not (m["fence"][0] == "`" and "`" in m["info"]):
            start, indent, fence = i + 1, len(m["indent"]), m["fence"]
            info = m["info"].strip()
            language = info.split()[0].lower() if info else ""
            body, i, closed = [], i + 1, False
            while i < len(lines):
                c = _CLOSE.match(lines[i])
                if c and c["fence"][0] == fence[0] and len(c["fence"]) >= len(fence):
                    closed = True
                    break
                body.append(_dedent(lines[i], indent))
                i += 1
            if not closed:
                problems.append(Problem(file, start, f"the {fence} fence opened here is never closed"))
            reason = error = None
            if pending is not None and pending[0] == start - 1:
                _, reason, error = pending
                if language not in RUNNABLE and error is None:
                    problems.append(Problem(file, start - 1, f"compile-only marker in front of a "
                                                             f"{language or 'plain'} block: only python and "
                                                             f"bash blocks are run"))
                    reason = None
                elif language not in RUNNABLE:
                    problems.append(Problem(file, start - 1, error))
                    error = None
            pending = None
            blocks.append(Block(file, start, language, "".join(s + "\n" for s in body), reason, error))
            i += 1
            continue
        if pending is not None:
            problems.append(Problem(file, pending[0], pending[2] or "compile-only marker not immediately followed "
                                                                    "by a fence line (no blank line between)"))
            pending = None
        if _MARKER_LIKE.match(stripped):
            reason, error = _marker(stripped)
            pending = (i + 1, reason, error)
        i += 1
    if pending is not None:
        problems.append(Problem(file, pending[0], pending[2] or "compile-only marker at the end of the page"))
    return blocks, problems


def _dedent(line: str, indent: int) -> str:
    """`line` with up to `indent` leading spaces removed (CommonMark's rule for an indented fence's content)."""
    n = 0
    while n < indent and n < len(line) and line[n] == " ":
        n += 1
    return line[n:]


def docs_pages(root: Path) -> list[Path]:
    """docs/*.md of the repository at `root`, sorted."""
    return sorted((root / "docs").glob("*.md"))


def doc_files(root: Path) -> list[Path]:
    """README.md (when there is one) and docs/*.md of the repository at `root`."""
    return ([root / "README.md"] if (root / "README.md").is_file() else []) + docs_pages(root)


def rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def collect(root: Path) -> tuple[list[Block], list[Problem]]:
    """The blocks and problems of every page of `doc_files(root)`."""
    blocks: list[Block] = []
    problems: list[Problem] = []
    for path in doc_files(root):
        b, p = parse(path.read_text(encoding="utf-8"), rel(path, root))
        blocks += b
        problems += p
    return blocks, problems


def alias_problems(blocks: list[Block]) -> list[Problem]:
    """Blocks tagged with a language that looks runnable but is not run (`py`, `sh`, `shell`, ...)."""
    return [Problem(b.file, b.line, f"a {b.language!r} block is not run: tag it {ALIASES[b.language]!r} "
                                    f"(an example) or 'text' (output or a sketch)")
            for b in blocks if b.language in ALIASES]


# --- running --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Outcome:
    command: str
    returncode: int | None
    """None: killed at the timeout."""
    stdout: str
    stderr: str
    seconds: float


def _run(argv: list[str], cwd: Path, env: dict | None, timeout: float, shown: str) -> Outcome:
    """Run `argv` in its own session; at the timeout, and after it exits, kill what is left of its process group
    (a launcher's workers, a background job), so that reading its output cannot hang on their pipes."""
    start = time.monotonic()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, errors="replace", start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        out, err = proc.communicate()
        code = None
    _kill_group(proc.pid)
    return Outcome(shown, code, out, err, time.monotonic() - start)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def example_env(root: Path) -> dict:
    """The environment of an example: this one, with the repository first on PYTHONPATH and this Python's bin
    directory first on PATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    env["PATH"] = os.pathsep.join(p for p in (os.path.dirname(sys.executable), env.get("PATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"  # what a killed example printed last is in its output
    if 0 < _gpus() < MOST_PROCESSES:
        # The examples launch up to MOST_PROCESSES processes on one machine: with fewer GPUs than that, every
        # example trains on the CPU (what `accelerate launch --cpu` sets), as on a machine without GPUs, rather
        # than being refused for launching more processes than there are GPUs.
        env["ACCELERATE_USE_CPU"] = "true"
    return env


MOST_PROCESSES = 4
"""The most processes an example launches on one machine (docs/cluster.md's HSDP example)."""


def _gpus() -> int:
    import torch

    return torch.cuda.device_count()


def numbered_source(block: Block) -> str:
    """The block's source after `block.line` empty lines, so that its line numbers are the page's."""
    return "\n" * block.line + block.source


def script_name(block: Block) -> str:
    """`README_62.py`, `engine_12.py`: a name that says where the block is and shadows no module."""
    stem = re.sub(r"\W", "_", Path(block.file).stem)
    return f"{stem}_{block.line}.py"


def check(block: Block, cwd: Path, root: Path) -> Outcome:
    """Compile a compile-only block, or run a block, in the empty directory `cwd`."""
    source = numbered_source(block)
    if block.compile_only is not None and block.language == "python":
        try:
            compile(source, block.id, "exec")
        except SyntaxError as e:
            return Outcome("compile()", 1, "", f"{type(e).__name__}: {e}", 0.0)
        return Outcome("compile()", 0, "", "", 0.0)
    if block.compile_only is not None:
        return _run(["bash", "-n", "-c", source], cwd, None, 10, "bash -n -c BLOCK")
    env = example_env(root)
    if block.language == "python":
        script = cwd / script_name(block)
        script.write_text(source, encoding="utf-8")
        return _run([sys.executable, script.name], cwd, env, TIMEOUT_S["python"], f"python {script.name}")
    for name in LINKED_INTO_BASH_CWD:
        if (root / name).exists():
            (cwd / name).symlink_to(root / name)
    return _run(["bash", "-euo", "pipefail", "-c", source], cwd, env, TIMEOUT_S["bash"],
                "bash -euo pipefail -c BLOCK")


def tail(text: str, lines: int = 40, chars: int = 4000) -> str:
    kept = "\n".join(text.rstrip().splitlines()[-lines:])
    return kept[-chars:] if kept else "(empty)"


def report(block: Block, outcome: Outcome) -> str:
    """A failed check, for the test's message."""
    what = "was killed after its timeout" if outcome.returncode is None else f"exited {outcome.returncode}"
    kind = "compile-only " if block.compile_only is not None else ""
    return (f"{kind}{block.language} example {block.id} {what} ({outcome.command}, {outcome.seconds:.1f} s; line "
            f"numbers are those of {block.file})\n--- stdout (tail) ---\n{tail(outcome.stdout)}\n"
            f"--- stderr (tail) ---\n{tail(outcome.stderr)}")


# --- links ----------------------------------------------------------------------------------------------------

_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(?P<target><[^<>\n]*>|[^\s()]+(?:\([^\s()]*\)[^\s()]*)*)"
                   r"(?:\s+(?:\"[^\"]*\"|'[^']*'|\([^()]*\)))?\s*\)")
_REF_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(?P<target><[^<>\n]*>|\S+)", re.MULTILINE)
_CODE_SPAN = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)", re.DOTALL)
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_HEADING = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(?P<text>.*?))?(?:[ \t]+#+)?[ \t]*$")
_HTML_ANCHOR = re.compile(r"<a\s[^>]*?\b(?:name|id)\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)


def _blank(m: re.Match) -> str:
    return re.sub(r"[^\n]", " ", m.group(0))


def prose(text: str, code_spans: bool = False) -> str:
    """`text` with fenced blocks and HTML comments blanked out, and inline code too unless `code_spans` (line
    numbers kept)."""
    lines = text.splitlines(keepends=True)
    for block in parse(text)[0]:
        end = block.line + block.source.count("\n")  # the closing fence's 0-based index
        for k in range(block.line - 1, min(end + 1, len(lines))):
            lines[k] = "\n" if lines[k].endswith("\n") else ""
    kept = _COMMENT.sub(_blank, "".join(lines))
    return kept if code_spans else _CODE_SPAN.sub(_blank, kept)


def links(text: str) -> list[tuple[int, str]]:
    """(line, target) of every inline link, image and link definition outside code, in the page's order; URLs
    with a scheme (http:, mailto:, ...) left out."""
    body = prose(text)
    found = []
    for m in sorted([*_LINK.finditer(body), *_REF_DEF.finditer(body)], key=lambda m: m.start()):
        target = m["target"].strip()
        if target.startswith("<") and target.endswith(">"):
            target = target[1:-1].strip()
        if target and not _SCHEME.match(target):
            found.append((body.count("\n", 0, m.start()) + 1, target))
    return found


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text: markup reduced to its text, lowercased, every character but
    letters, digits, spaces, '-' and '_' dropped, spaces made '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link or image: its text
    text = re.sub(r"<[^>]+>", "", text)  # HTML tags
    text = text.strip().lower()
    kept = "".join(ch for ch in text if ch in " -_" or unicodedata.category(ch)[0] in "LNM")
    return kept.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors a page has: its ATX headings' slugs (a repeated slug gets -1, -2, ... as on GitHub) and the
    name/id of its `<a>` tags."""
    body = prose(text, code_spans=True)  # a heading's code is part of its text
    seen: dict[str, int] = {}
    found = set(_HTML_ANCHOR.findall(body))
    for line in body.splitlines():
        m = _HEADING.match(line)
        if m is None:
            continue
        s = slug(m["text"] or "")
        n = seen.get(s, 0)
        seen[s] = n + 1
        found.add(s if n == 0 else f"{s}-{n}")
    return found


def resolve(root: Path, page: Path, target: str) -> tuple[Path, str]:
    """(the file or directory, the anchor) a relative link of `page` points to, normalized: a path from the
    page's directory, or from the repository root when it starts with '/' (as on GitHub); none: the page."""
    path, _, anchor = target.partition("#")
    path = unquote(path.split("?", 1)[0])
    dest = page if not path else root / path.lstrip("/") if path.startswith("/") else page.parent / path
    return Path(os.path.normpath(dest)), unquote(anchor)


def broken_links(root: Path, pages: list[Path]) -> list[str]:
    """Every relative link of `pages` (repository files) that points to no file or directory of the repository,
    or to a heading its Markdown target does not have."""
    broken = []
    page_anchors: dict[Path, set[str]] = {}
    for page in pages:
        for line, target in links(page.read_text(encoding="utf-8")):
            where = f"{rel(page, root)}:{line}: link ({target})"
            dest, anchor = resolve(root, page, target)
            if not dest.is_relative_to(root):
                broken.append(f"{where} points outside the repository")
            elif not dest.exists():
                broken.append(f"{where}: {rel(dest, root)} does not exist")
            elif anchor and dest.suffix.lower() == ".md" and dest.is_file():
                if dest not in page_anchors:
                    page_anchors[dest] = anchors(dest.read_text(encoding="utf-8"))
                if anchor not in page_anchors[dest] and anchor.lower() not in page_anchors[dest]:
                    broken.append(f"{where}: {rel(dest, root)} has no heading with the anchor #{anchor}")
    return broken


def linked_pages(root: Path, page: Path) -> set[Path]:
    """The files a page links to (anchors dropped), resolved."""
    found = set()
    for _, target in links(page.read_text(encoding="utf-8")):
        found.add(resolve(root, page, target)[0])
    return found
