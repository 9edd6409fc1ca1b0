"""The examples of README.md and docs/*.rst run, and print what the page says they print.

A user copies the examples first, so each Python block is a test case, with id ``file:line`` (the line of its
``.. code-block::`` directive, ``::`` paragraph or Markdown fence). Which blocks count as Python:

* rst: ``.. code-block::`` (or ``code``, ``sourcecode``) in ``python``, ``py``, ``python3`` or ``pycon``, and
  ``::`` literal blocks whose text compiles as Python (shell commands and verbatim output do not);
* Markdown: fences opened with ```` ```python ````, ```` ```py ```` or ```` ```pycon ````.

**Grouping: a page reads top to bottom.** The blocks of one file share one namespace and run in page order, so a
block may use what an earlier block of its page defined. Each block is still its own test; one run without its
predecessors (``-k``, or after one of them failed) replays the page's earlier blocks first. Every page starts
from a fresh namespace, in a fresh temporary working directory, with ``MPLBACKEND=Agg`` and ``HF_HUB_OFFLINE=1``.

Two rst comments (invisible on the rendered page) steer the test; README.md has none, its examples are complete:

* ``.. example-setup`` with indented code below it: hidden code run just before the next block, in the same
  namespace, for names the example takes as given (your ``X``, your ``model``). Prefer complete examples;
* ``.. slow-example`` just before a block: the block takes more than a few seconds, so it and every later block of
  its page (which may use its results) are marked ``slow`` and run with ``python -m pytest -m slow``.

Documented output is checked. A ``pycon`` block runs as a doctest (``ELLIPSIS``, ``NORMALIZE_WHITESPACE``). In a
Python block, a top-level expression followed by the comment ``# -> VALUE`` or ``# -> VALUE: explanation`` must
evaluate to the Python literal ``VALUE``; a float matches to the decimals it shows (``# -> 0.066`` accepts
0.0655 to 0.0665). Write ``# ->`` only where the output is deterministic.

Commands: every ``python some/script.py`` and ``submod <subcommand>`` that starts an inline literal or a line of a
literal block must name an existing script or subcommand, and each flag written after it must appear in its
``--help``.
"""

from __future__ import annotations

import ast
import contextlib
import doctest
import io
import os
import re
import runpy
import sys
import textwrap
import tokenize
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

import submod.cli

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.rst"))]
PYTHON = {"python", "py", "python3", "pycon"}


@dataclass(frozen=True)
class Block:
    """A literal block of a page: its language, code (dedented) and where it is."""

    path: Path
    line: int  # 1-based line of the directive, ``::`` paragraph or fence that opens it
    first: int  # 1-based line of its first code line
    last: int  # 1-based line of its last line (of code; the closing fence in Markdown)
    language: str  # "python", "pycon", or another name ("console", "bash", "text" for a non-Python ``::``)
    code: str
    setup: Block | None = field(default=None, compare=False)
    slow: bool = False

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT).as_posix()}:{self.line}"


# --------------------------------------------------------------------------------------------- parsing the pages

_RST_DIRECTIVE = re.compile(r"(\s*)\.\. (?:code-block|code|sourcecode)::\s*(\S*)\s*$")
_RST_MARKER = re.compile(r"\s*\.\. (example-setup|slow-example)\s*$")
_MD_FENCE = re.compile(r"\s*```\s*([\w+-]*)\s*$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _body(lines: list[str], start: int, indent: int, options: bool) -> tuple[int, int, str]:
    """The text indented deeper than ``indent`` from ``lines[start]`` on (after blank lines and, for a directive,
    its ``:option:`` lines): (index of its first line, index after its last line, dedented text)."""
    i = start
    while i < len(lines) and (not lines[i].strip() or (options and lines[i].strip().startswith(":")
                                                       and _indent(lines[i]) > indent)):
        i += 1
    end = i
    while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) > indent):
        end += 1
    while end > i and not lines[end - 1].strip():
        end -= 1
    return i, end, textwrap.dedent("\n".join(lines[i:end]))


def _compiles(code: str) -> bool:
    try:
        compile(code, "<literal block>", "exec")
    except SyntaxError:
        return False
    return True


def rst_blocks(path: Path, text: str) -> list[Block]:
    """Every literal block of an rst page, with its hidden setup and slow flag."""
    lines = text.splitlines()
    blocks: list[Block] = []
    setup: Block | None = None
    slow = False  # a slow block makes the rest of its page slow
    marked_slow = False
    i = 0
    while i < len(lines):
        line = lines[i]
        marker, directive = _RST_MARKER.match(line), _RST_DIRECTIVE.match(line)
        if marker and marker[1] == "example-setup":
            first, i, code = _body(lines, i + 1, _indent(line), options=False)
            setup = Block(path, first + 1, first + 1, i, "python", code)
            continue
        if marker:
            marked_slow = True
        elif directive or (line.rstrip().endswith("::") and not line.lstrip().startswith("..")):
            first, end, code = _body(lines, i + 1, _indent(line), options=bool(directive))
            language = directive[2].lower() if directive else ("python" if _compiles(code) else "text")
            if (setup or marked_slow) and language not in PYTHON:
                raise ValueError(f"{path.name}:{i + 1}: an example-setup or slow-example marker precedes a "
                                 f"{language!r} block; markers go just before a Python block")
            slow = slow or marked_slow
            blocks.append(Block(path, i + 1, first + 1, end, language, code, setup, slow and language in PYTHON))
            setup, marked_slow = None, False
            i = end
            continue
        i += 1
    return blocks


def markdown_blocks(path: Path, text: str) -> list[Block]:
    """Every fenced block of a Markdown page."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        fence = _MD_FENCE.match(lines[i])
        if fence is None:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        code = textwrap.dedent("\n".join(lines[i + 1:end]))
        blocks.append(Block(path, i + 1, i + 2, end + 1, fence[1].lower() or "text", code))
        i = end + 1
    return blocks


def page_blocks(path: Path, text: str | None = None) -> list[Block]:
    text = path.read_text(encoding="utf-8") if text is None else text
    return markdown_blocks(path, text) if path.suffix == ".md" else rst_blocks(path, text)


# ---------------------------------------------------------------------------------------------- running a block

def _documented_values(source: str) -> dict[int, str]:
    """``{line: VALUE}`` for every ``# -> VALUE`` (or ``# -> VALUE: explanation``) comment of ``source``."""
    found = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and tok.string.startswith("# ->"):
            found[tok.start[0]] = re.split(r":\s", tok.string[len("# ->"):].strip(), maxsplit=1)[0]
    return found


def shows(actual: object, documented: str) -> bool:
    """Whether ``actual`` is what ``# -> documented`` says: a float to the decimals shown, anything else equal
    (numpy arrays and scalars compared as the Python values they hold)."""
    expected = ast.literal_eval(documented)
    if isinstance(expected, float):
        decimals = len(documented.partition(".")[2])
        return abs(float(actual) - expected) <= 0.5 * 10.0 ** -decimals * (1 + 1e-9)
    if isinstance(actual, np.ndarray | np.generic):
        actual = actual.tolist()
    return type(actual) is type(expected) and actual == expected


def _run_python(block: Block, namespace: dict) -> None:
    source = "\n" * (block.first - 1) + block.code  # keeps the page's line numbers in tracebacks
    filename = str(block.path)
    documented = _documented_values(source)
    for stmt in ast.parse(source, filename).body:
        value = documented.pop(stmt.end_lineno, None)
        if value is None:
            exec(compile(ast.Module([stmt], type_ignores=[]), filename, "exec"), namespace)
            continue
        assert isinstance(stmt, ast.Expr), f"{block.path.name}:{stmt.end_lineno}: '# ->' follows a statement"
        actual = eval(compile(ast.Expression(stmt.value), filename, "eval"), namespace)
        assert shows(actual, value), (f"{block.path.name}:{stmt.end_lineno}: {ast.unparse(stmt)} is {actual!r}, "
                                      f"the page says {value}")
    assert not documented, f"'# ->' inside a compound statement or on a non-final line: {documented}"


def _run_pycon(block: Block, namespace: dict) -> None:
    test = doctest.DocTestParser().get_doctest(block.code, namespace, block.name, str(block.path), block.first - 1)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report = io.StringIO()
    runner.run(test, out=report.write, clear_globs=False)
    assert runner.failures == 0, report.getvalue()
    namespace.update(test.globs)  # the doctest ran in a copy


def run_block(block: Block, namespace: dict) -> None:
    if block.setup is not None:
        _run_python(block.setup, namespace)
    (_run_pycon if block.language == "pycon" else _run_python)(block, namespace)


# ------------------------------------------------------------------------------------------------- the examples

PAGE_EXAMPLES = {path: [b for b in page_blocks(path) if b.language in PYTHON] for path in PAGES}
EXAMPLES = [block for blocks in PAGE_EXAMPLES.values() for block in blocks]


@dataclass
class PageRun:
    """A page's namespace and working directory after its first ``done`` examples ran."""

    namespace: dict
    workdir: Path
    done: int = 0


@pytest.fixture(scope="session")
def page_runs() -> dict[Path, PageRun]:
    return {}


@pytest.mark.parametrize("block", [pytest.param(b, id=b.name, marks=[pytest.mark.slow] if b.slow else [])
                                   for b in EXAMPLES])
def test_example_runs_and_shows_what_the_page_says(block, page_runs, tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    earlier = PAGE_EXAMPLES[block.path][:PAGE_EXAMPLES[block.path].index(block)]
    run = page_runs.pop(block.path, None)  # put back only if this example passes
    if run is None or run.done != len(earlier):
        run = PageRun({"__name__": "__main__"}, tmp_path_factory.mktemp(block.path.stem))
        monkeypatch.chdir(run.workdir)
        for before in earlier:
            try:
                run_block(before, run.namespace)
            except Exception as exc:
                raise AssertionError(f"{before.name}, which this example builds on, fails") from exc
    monkeypatch.chdir(run.workdir)
    run_block(block, run.namespace)
    run.done = len(earlier) + 1
    page_runs[block.path] = run


# ------------------------------------------------------------------------------------------------- the commands

_COMMAND = re.compile(r"(?:\$\s+)?"  # a console prompt
                      r"(?:python\s+(?P<script>[\w./-]+\.py)|submod\s+(?P<sub>[a-z][\w-]*))"
                      r"(?P<args>[^`#;&]*)")  # up to the end of the literal, a comment or the next command
_FLAG = re.compile(r"(?<![\w-])--?[A-Za-z][\w-]*")


def commands(path: Path) -> list[tuple[str, str, list[str]]]:
    """``(where, program, flags)`` for every command that starts an inline literal or a line (or an ``&&`` part
    of one) of a literal block that is not Python; ``program`` is ``"submod <subcommand>"`` or a script path."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    candidates = []  # (line number, text that may start with a command)
    in_blocks: set[int] = set()
    for block in page_blocks(path, text):
        in_blocks.update(range(block.line, block.last + 1))
        if block.language not in PYTHON:
            candidates += [(n, part) for n in range(block.first, block.last + 1) for part in lines[n - 1].split("&&")]
    prose = "\n".join("" if n in in_blocks else line for n, line in enumerate(lines, 1))
    inline = r"``(.+?)``" if path.suffix == ".rst" else r"`([^`]+)`"
    candidates += [(prose.count("\n", 0, m.start()) + 1, m[1].replace("\n", " "))
                   for m in re.finditer(inline, prose, flags=re.DOTALL)]
    found = []
    for n, candidate in candidates:
        if command := _COMMAND.match(candidate.strip()):
            program = command["script"] or f"submod {command['sub']}"
            found.append((f"{path.relative_to(ROOT).as_posix()}:{n}", program, _FLAG.findall(command["args"])))
    return found


MENTIONS: dict[str, list[tuple[str, list[str]]]] = {}
for _page in PAGES:
    for _where, _program, _flags in commands(_page):
        MENTIONS.setdefault(_program, []).append((_where, _flags))


def help_text(program: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The ``--help`` output of a ``submod`` subcommand or a script, run in this process (a new one would import
    torch again: seconds per script)."""
    if program.startswith("submod "):
        def show_help() -> None:
            submod.cli.main([program.split()[1], "--help"])
    else:
        monkeypatch.setattr(sys, "argv", [program, "--help"])
        # `python benchmarks/x.py` puts the script's folder first on sys.path (its sibling modules import)
        monkeypatch.setattr(sys, "path", [str((ROOT / program).parent), *sys.path])
        monkeypatch.setattr(os, "environ", os.environ.copy())  # and set defaults in it

        def show_help() -> None:
            runpy.run_path(str(ROOT / program), run_name="__main__")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out), pytest.raises(SystemExit) as exit_:
        show_help()
    assert exit_.value.code == 0, f"`{program} --help` fails:\n{out.getvalue()}"
    return out.getvalue()


@pytest.mark.parametrize("program", sorted(MENTIONS))
def test_documented_commands_and_flags_exist(program, monkeypatch):
    mentions = MENTIONS[program]
    if not program.startswith("submod "):
        assert (ROOT / program).is_file(), f"{program}, run at {[where for where, _ in mentions]}, does not exist"
        if not any(flags for _, flags in mentions):
            return  # nothing to check in a --help that the script may not have
    known = set(_FLAG.findall(help_text(program, monkeypatch)))
    unknown = [(where, flag) for where, flags in mentions for flag in flags if flag not in known]
    assert not unknown, f"flags of {program} that its --help does not list: {unknown}"


# -------------------------------------------------------------------------------------------- the self-checks

WRONG_KEYWORD = """\
Text.

.. code-block:: python

   import submod
   f = submod.Modular([1.0, 2.0, 3.0])
   submod.maximize(f, 2, methd="lazy")
"""

WRONG_VALUE = """\
.. example-setup

   import submod

.. code-block:: python

   f = submod.Modular([1.0, 2.0, 3.0])
   submod.maximize(f, 2).value       # -> 4.0: the two largest weights
"""

SHARED_PAGE = """\
A literal block that is Python::

   x = 40

and one that is not::

   submod demo --out here

.. slow-example

.. code-block:: pycon

   >>> x + 2
   42

.. code-block:: python

   x                                 # -> 40
"""


@pytest.mark.parametrize(("page", "error"), [(WRONG_KEYWORD, TypeError), (WRONG_VALUE, AssertionError)],
                         ids=["wrong keyword", "wrong value"])
def test_a_stale_example_fails(page, error):
    (block,) = page_blocks(ROOT / "docs" / "page.rst", page)
    with pytest.raises(error):
        run_block(block, {})


def test_blocks_of_a_page_share_a_namespace_and_slowness_carries_forward():
    blocks = page_blocks(ROOT / "docs" / "page.rst", SHARED_PAGE)
    assert [(b.language, b.slow) for b in blocks] == [("python", False), ("text", False), ("pycon", True),
                                                      ("python", True)]
    namespace: dict = {}
    for block in blocks:
        if block.language in PYTHON:
            run_block(block, namespace)
    assert namespace["x"] == 40


def test_documented_floats_match_to_the_decimals_shown():
    assert shows(0.06556, "0.066") and not shows(0.0664, "0.065")
    assert shows(np.float64(0.0), "0.0") and shows(np.array([1, 2]), "[1, 2]") and shows(np.True_, "True")
    assert not shows(1, "True") and not shows(1.0, "1")
