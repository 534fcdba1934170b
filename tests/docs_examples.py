"""The code blocks of docs/*.md, for the tests that run them.

The conventions (also stated in docs/index.md):

- Every fenced block opened with ```` ```python ```` is a complete program
  that ``tests/test_docs.py`` runs, unless the line before it (blank lines
  aside) is ``<!-- not-run -->``. Use that marker for fragments.
- A runnable block may define ``async def main() -> None``; the test awaits
  it under a hang guard, against a mock upstream on a free port. The block's
  ``if __name__ == "__main__": trio.run(main)`` tail does not run, since the
  block is executed as a module of another name.
- Examples talk to ``http://127.0.0.1:9000``, where ``llm-proxy
  mock-upstream`` listens by default; the tests put the URL of their own
  mock upstream in its place.
- ``<!-- example: NAME -->`` before a block names it, so that other tests
  can load it with :func:`example` and use what it defines (a sink, a bus).
  Both markers may precede one block, one per line.
- ``<!-- output -->`` before a block (```` ```text ````, say) that follows a
  runnable block says that it is what that program prints; the test checks
  it, line for line.
"""

from __future__ import annotations

import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import attrs

DOCS_DIR = Path(__file__).resolve().parent.parent / "docs"
README = DOCS_DIR.parent / "README.md"
DOCS_UPSTREAM_URL = "http://127.0.0.1:9000"
NOT_RUN_MARKER = "<!-- not-run -->"
OUTPUT_MARKER = "<!-- output -->"

_FENCE = re.compile(r"^```(\S*)")
_NAME_MARKER = re.compile(r"^<!--\s*example:\s*([\w-]+)\s*-->$")


@attrs.frozen
class CodeBlock:
    """One fenced code block of a Markdown file."""

    path: Path
    line: int
    language: str
    source: str
    name: str | None = None
    runnable: bool = True
    is_output: bool = False
    #: What the program prints, from the ``<!-- output -->`` block after it.
    output: str | None = None

    @property
    def id(self) -> str:
        """A test ID such as ``embedding.md:42`` (the fence's line)."""
        return f"{self.path.name}:{self.line}"

    def load(self, upstream_url: str = DOCS_UPSTREAM_URL) -> types.ModuleType:
        """Execute the block as a fresh module, pointing it at ``upstream_url``.

        The module is registered in ``sys.modules`` so that what it defines
        behaves like code imported from a file (pickling, type hints).
        """
        source = self.source.replace(DOCS_UPSTREAM_URL, upstream_url)
        stem = re.sub(r"\W", "_", f"{self.path.stem}_{self.name or self.line}")
        module = types.ModuleType(f"docs_example_{stem}")
        module.__file__ = f"{self.path}:{self.line}"
        sys.modules[module.__name__] = module
        code = compile(source, module.__file__, "exec")
        exec(code, module.__dict__)
        return module


def _markers(lines: list[str], fence: int) -> tuple[str | None, bool, bool]:
    """Read the HTML comment markers on the lines right before a fence."""
    name, runnable, is_output = None, True, False
    index = fence - 1
    while index >= 0 and not lines[index].strip():
        index -= 1
    while index >= 0 and lines[index].strip().startswith("<!--"):
        text = lines[index].strip()
        if text == NOT_RUN_MARKER:
            runnable = False
        elif text == OUTPUT_MARKER:
            is_output = True
        elif found := _NAME_MARKER.match(text):
            name = found.group(1)
        index -= 1
    return name, runnable, is_output


def code_blocks(path: Path) -> list[CodeBlock]:
    """Return the fenced code blocks of the Markdown file at ``path``.

    A block followed by an ``<!-- output -->`` block carries that block's
    text as its :attr:`CodeBlock.output`.
    """
    blocks = list(_fenced_blocks(path))
    for index, block in enumerate(blocks[:-1]):
        after = blocks[index + 1]
        if after.is_output:
            blocks[index] = attrs.evolve(block, output=after.source)
    return blocks


def _fenced_blocks(path: Path) -> Iterator[CodeBlock]:
    lines = path.read_text(encoding="utf-8").splitlines()
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        start = index
        index += 1
        while index < len(lines) and not lines[index].startswith("```"):
            index += 1
        name, runnable, is_output = _markers(lines, start)
        yield CodeBlock(
            path=path,
            line=start + 1,
            language=opening.group(1),
            source="\n".join(lines[start + 1 : index]) + "\n",
            name=name,
            runnable=runnable,
            is_output=is_output,
        )
        index += 1


def doc_files() -> list[Path]:
    """Return the Markdown files of docs/, sorted."""
    return sorted(DOCS_DIR.glob("*.md"))


def python_blocks() -> list[CodeBlock]:
    """Return every ```` ```python ```` block of docs/*.md, runnable or not."""
    return [
        block
        for path in doc_files()
        for block in code_blocks(path)
        if block.language == "python"
    ]


def example(name: str) -> CodeBlock:
    """Return the block of docs/ named ``<!-- example: name -->``."""
    found = [
        block
        for path in doc_files()
        for block in code_blocks(path)
        if block.name == name
    ]
    if len(found) != 1:
        msg = f"expected one docs example named {name!r}, found {len(found)}"
        raise LookupError(msg)
    return found[0]
