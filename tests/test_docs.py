"""The docs hold: their examples run, and their tables match the program.

Conventions for docs/*.md (see tests/docs_examples.py for the details):

- Every ```` ```python ```` block runs here, unless the line before it is
  ``<!-- not-run -->``. A runnable block is a complete program; if it defines
  ``async def main()``, that is awaited under a hang guard.
- Examples use ``http://127.0.0.1:9000`` (where ``llm-proxy mock-upstream``
  listens by default); here it is replaced with a mock upstream on a free
  loopback port.
- ``<!-- example: NAME -->`` names a block so that other tests can load it.
- ``<!-- output -->`` marks the block after a program as what it prints; the
  program's standard output must match it.
- The example event in docs/events.md comes from a real run. When the event
  changes shape on purpose, regenerate it with
  ``UPDATE_DOCS=1 python -m pytest tests/test_docs.py``.
- The flag tables of docs/configuration.md and of the README are checked
  against the click definitions of the CLI: every flag, variable and default
  appears, and nothing else does.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any

import attrs
import click
import httpx
import pytest
import trio
from docs_examples import (
    DOCS_DIR,
    README,
    CodeBlock,
    code_blocks,
    example,
    python_blocks,
)

import trio_llmproxy
from trio_llmproxy import ProxyConfig, ServerHandle, serve
from trio_llmproxy._cli import cli

HANG_GUARD_SECONDS = 30.0
EVENTS_DOC = DOCS_DIR / "events.md"
CONFIGURATION_DOC = DOCS_DIR / "configuration.md"
# Fields of the example event that change from run to run; every other value
# is deterministic, because the mock upstream is.
VOLATILE_FIELDS = frozenset(
    {"event_id", "request_id", "timestamp", "duration_ms", "ttfb_ms"}
)
# Variables the docs may name that are not an option's own variable.
EXTRA_VARIABLES = frozenset(
    {
        "REDIS_ADDR",
        "REDIS_DB",
        "OBSERVABILITY_ENABLED",
        # The forward proxy to reach the upstream through, read by httpx.
        "HTTPS_PROXY",
        "HTTP_PROXY",
        "ALL_PROXY",
        "NO_PROXY",
    }
)
# The examples every embedding user needs; other tests load some of them.
REQUIRED_EXAMPLES = (
    "quickstart",
    "subscription",
    "enrich",
    "sqlite-sink",
    "create-app",
    "middleware",
    "channel-bus",
)

_CELL_SPLIT = re.compile(r"(?<!\\)\|")
_CODE = re.compile(r"`([^`]+)`")
_COMMAND_HEADING = re.compile(r"^## `([\w-]+)`$")
_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
_VARIABLE = re.compile(r"`([A-Z][A-Z0-9]*_[A-Z0-9_]+)`")


def _runnable_blocks() -> list[Any]:
    return [
        pytest.param(block, id=block.id) for block in python_blocks() if block.runnable
    ]


@pytest.mark.parametrize("block", _runnable_blocks())
async def test_python_block_runs(
    block: CodeBlock, mock_upstream_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    module = block.load(mock_upstream_url)

    main = getattr(module, "main", None)
    if main is not None:
        with trio.fail_after(HANG_GUARD_SECONDS):
            await main()

    if block.output is not None:
        assert capsys.readouterr().out == block.output


@pytest.mark.parametrize("name", REQUIRED_EXAMPLES)
def test_named_example_exists_and_runs(name: str) -> None:
    block = example(name)

    assert block.runnable
    assert block.language == "python"
    assert "async def main()" in block.source


def test_embedding_doc_lists_every_public_name() -> None:
    text = (DOCS_DIR / "embedding.md").read_text(encoding="utf-8")
    api = text.split("\n## The public API\n", 1)[1]

    missing = [name for name in trio_llmproxy.__all__ if f"`{name}" not in api]

    assert missing == [], "public names missing from embedding.md's API table"


# The example event of docs/events.md.


async def _produce_example_event(upstream_url: str) -> dict[str, Any]:
    """Return the JSON object of one streamed chat completion via the proxy."""
    config = ProxyConfig(listen="127.0.0.1:0", upstream_url=upstream_url)
    with trio.fail_after(HANG_GUARD_SECONDS):
        async with trio.open_nursery() as nursery:
            handle: ServerHandle = await nursery.start(serve, config)
            async with handle.bus.subscribe("docs") as subscription:
                async with httpx.AsyncClient(base_url=handle.addresses[0]) as client:
                    response = await client.post(
                        "/v1/chat/completions",
                        headers={
                            "Authorization": "Bearer sk-demo-0000000000001234",
                            "X-Mock-Chunk-Count": "2",
                        },
                        json={
                            "model": "mock-gpt",
                            "stream": True,
                            "messages": [{"role": "user", "content": "Hi"}],
                        },
                    )
                    response.raise_for_status()
                event = await subscription.events().__anext__()
            handle.shutdown()
    return event.to_dict()


def _example_event_block() -> CodeBlock:
    block = example("event")
    assert block.path == EVENTS_DOC
    assert block.language == "json"
    return block


def _rewrite_block(block: CodeBlock, text: str) -> None:
    lines = block.path.read_text(encoding="utf-8").splitlines(keepends=True)
    end = block.line + len(block.source.splitlines())
    lines[block.line : end] = [text if text.endswith("\n") else text + "\n"]
    block.path.write_text("".join(lines), encoding="utf-8")


def _render_event(event: dict[str, Any]) -> str:
    """Render an event as JSON with one line per field and per header."""
    lines = ["{"]
    for index, (key, value) in enumerate(event.items()):
        comma = "," if index < len(event) - 1 else ""
        if isinstance(value, dict) and value:
            lines.append(f"  {json.dumps(key)}: {{")
            lines.append(
                ",\n".join(
                    f"    {json.dumps(k)}: {json.dumps(v)}" for k, v in value.items()
                )
            )
            lines.append(f"  }}{comma}")
        else:
            lines.append(f"  {json.dumps(key)}: {json.dumps(value)}{comma}")
    lines.append("}")
    return "\n".join(lines)


def _shape(value: Any) -> Any:
    """The JSON type of a value, which must match between two events."""
    return type(value).__name__


async def test_events_doc_example_matches_a_real_event(
    mock_upstream_url: str,
) -> None:
    real = await _produce_example_event(mock_upstream_url)
    if os.environ.get("UPDATE_DOCS") == "1":
        _rewrite_block(_example_event_block(), _render_event(real))

    documented = json.loads(_example_event_block().source)

    assert list(documented) == list(real)
    for key, value in real.items():
        assert _shape(documented[key]) == _shape(value), key
        if key.endswith("_headers"):
            assert sorted(documented[key]) == sorted(value), key
        elif key == "llm":
            # Its time to first token changes from run to run.
            assert {**documented[key], "ttft_ms": 0} == {**value, "ttft_ms": 0}
        elif key not in VOLATILE_FIELDS:
            assert documented[key] == value, key


def test_events_doc_lists_every_field_of_an_event() -> None:
    documented = json.loads(_example_event_block().source)
    table = EVENTS_DOC.read_text(encoding="utf-8").split("## Fields", 1)[1]

    missing = [key for key in documented if f"| `{key}` |" not in table]

    assert missing == []


# The configuration tables.


def _cells(row: str) -> list[str]:
    return [cell.strip() for cell in _CELL_SPLIT.split(row.strip().strip("|"))]


def _value(cell: str) -> str:
    """The first code span of a cell (unescaped), or the cell's plain text."""
    found = _CODE.search(cell)
    return (found.group(1) if found else cell).replace("\\|", "|").strip()


def _flag_table(section: str) -> dict[str, tuple[str, str]]:
    """Map each flag of a section's first flag table to (variable, default)."""
    rows: dict[str, tuple[str, str]] = {}
    header: list[str] | None = None
    for line in section.splitlines():
        if not line.startswith("|"):
            if header is not None and rows:
                break
            continue
        cells = _cells(line)
        if header is None:
            if cells[:1] == ["flag"]:
                header = cells
            continue
        if set(line) <= set("|- "):
            continue
        row = dict(zip(header, cells, strict=True))
        flag = _value(row["flag"]).split()[0]
        assert flag not in rows, f"{flag} is documented twice"
        rows[flag] = (_value(row["variable"]), _value(row["default"]))
    return rows


def _sections(text: str) -> dict[str, str]:
    """Map each ``## `command` `` heading to the text of its section."""
    sections: dict[str, str] = {}
    parts = re.split(r"^(## .*)$", text, flags=re.MULTILINE)
    for heading, body in zip(parts[1::2], parts[2::2], strict=True):
        found = _COMMAND_HEADING.match(heading)
        if found:
            sections[found.group(1)] = body
    return sections


def _readme_configuration() -> str:
    text = README.read_text(encoding="utf-8")
    return re.split(r"^## ", text.split("\n## Configuration\n", 1)[1], flags=re.M)[0]


def _documented_default(option: click.Option) -> str:
    if option.required:
        return "required"
    if isinstance(option.show_default, str):
        # "redis://127.0.0.1:6379/0, or from REDIS_ADDR and REDIS_DB"
        return option.show_default.split(",")[0].strip()
    default = option.default
    if isinstance(default, float) and default.is_integer():
        return str(int(default))
    return str(default)


def _cli_table(command: click.Command) -> dict[str, tuple[str, str]]:
    table: dict[str, tuple[str, str]] = {}
    for param in command.params:
        assert isinstance(param, click.Option), param
        flag = max(param.opts, key=len)
        assert isinstance(param.envvar, str), f"{flag} has no variable"
        table[flag] = (param.envvar, _documented_default(param))
    return table


def _drift(
    documented: dict[str, tuple[str, str]], actual: dict[str, tuple[str, str]]
) -> dict[str, object]:
    """Say what a flag table gets wrong: missing, stale and differing rows."""
    return {
        "missing (flag: (variable, default))": {
            flag: row for flag, row in actual.items() if flag not in documented
        },
        "stale": sorted(set(documented) - set(actual)),
        "wrong (documented, actual)": {
            flag: (documented[flag], row)
            for flag, row in actual.items()
            if flag in documented and documented[flag] != row
        },
    }


def _all_flags() -> set[str]:
    flags = {"--help"}
    for command in cli.commands.values():
        for param in command.params:
            flags.update(param.opts)
    return flags


def _all_variables() -> set[str]:
    return {
        param.envvar
        for command in cli.commands.values()
        for param in command.params
        if isinstance(param.envvar, str)
    }


def test_configuration_doc_has_a_section_per_command() -> None:
    sections = _sections(CONFIGURATION_DOC.read_text(encoding="utf-8"))

    assert sorted(sections) == sorted(cli.commands)


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_configuration_doc_table_matches_the_cli(name: str) -> None:
    sections = _sections(CONFIGURATION_DOC.read_text(encoding="utf-8"))
    assert name in sections, f"docs/configuration.md has no ## `{name}` section"

    documented = _flag_table(sections[name])

    actual = _cli_table(cli.commands[name])
    assert documented == actual, _drift(documented, actual)


def test_readme_configuration_table_matches_the_server_command() -> None:
    documented = _flag_table(_readme_configuration())

    actual = _cli_table(cli.commands["server"])
    assert documented == actual, _drift(documented, actual)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(CONFIGURATION_DOC.read_text(encoding="utf-8"), id="configuration"),
        pytest.param(_readme_configuration(), id="readme"),
    ],
)
def test_configuration_docs_name_no_unknown_flag_or_variable(text: str) -> None:
    unknown_flags = set(_FLAG.findall(text)) - _all_flags()
    unknown_variables = set(_VARIABLE.findall(text)) - _all_variables()

    assert unknown_flags == set()
    assert unknown_variables <= EXTRA_VARIABLES


def test_configuration_doc_names_every_proxy_config_field() -> None:
    text = CONFIGURATION_DOC.read_text(encoding="utf-8")

    missing = [f.name for f in attrs.fields(ProxyConfig) if f"`{f.name}`" not in text]

    assert missing == [], "ProxyConfig fields missing from docs/configuration.md"


def test_markers_are_read_from_the_lines_before_a_fence(tmp_path: Any) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "<!-- example: one -->\n```python\nx = 1\n```\n\n"
        "<!-- not-run -->\n\n```python\nawait y\n```\n",
        encoding="utf-8",
    )

    first, second = code_blocks(page)

    assert (first.name, first.runnable, first.source) == ("one", True, "x = 1\n")
    assert (second.name, second.runnable, second.line) == (None, False, 8)


def test_output_block_is_attached_to_the_program_before_it(tmp_path: Any) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "```python\nprint(1)\n```\n\nIt prints:\n\n<!-- output -->\n```text\n1\n```\n",
        encoding="utf-8",
    )

    program, output = code_blocks(page)

    assert program.output == "1\n"
    assert output.is_output


# The README's SDK example, against a real proxy in front of the mock.

README_PROXY_URL = "http://127.0.0.1:8080"


async def test_readme_sdk_example_prints_the_streamed_answer(
    mock_upstream_url: str,
) -> None:
    (block,) = [b for b in code_blocks(README) if b.language == "python"]
    config = ProxyConfig(listen="127.0.0.1:0", upstream_url=mock_upstream_url)

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with trio.open_nursery() as nursery:
            handle: ServerHandle = await nursery.start(serve, config)
            proxy_url = handle.addresses[0]
            async with handle.bus.subscribe("readme") as subscription:
                # The example is a synchronous program: run it as one.
                program = block.source.replace(README_PROXY_URL, proxy_url)
                result = await trio.run_process(
                    [sys.executable, "-c", program], capture_stdout=True
                )
                event = await subscription.events().__anext__()
            handle.shutdown()

    answer = "".join(
        choice["delta"].get("content") or ""
        for data in event.to_dict()["response_body"].split("data: ")[1:]
        if not data.startswith("[DONE]")
        for choice in json.loads(data)["choices"]
    )
    assert answer
    assert result.stdout.decode() == answer + "\n"
    assert event.to_dict()["llm"]["usage"]["total_tokens"] > 0
