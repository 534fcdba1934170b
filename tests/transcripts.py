"""Hand-written transcripts of real stream shapes, and ways to replay them.

The transcripts in ``tests/streams/`` are written in the shapes real
providers send; ``manifest.json`` gives each one's request path and body
and the chunk boundaries it was "recorded" with.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import orjson
import trio

STREAMS = Path(__file__).parent / "streams"
MANIFEST: dict[str, Any] = json.loads((STREAMS / "manifest.json").read_text())
COMPLETE = ("chat_tools", "azure_chat", "responses", "anthropic")
# Where each stream's terminal event starts; a cut stream ends just before.
TERMINALS = {
    "chat_tools": b"data: [DONE]",
    "azure_chat": b"data: [DONE]",
    "responses": b"event: response.completed",
    "anthropic": b"event: message_stop",
}
# A piece of each stream's first event that carries generated content.
FIRST_CONTENT = {
    "chat_tools": "Je vérifie",
    "azure_chat": "東京の",
    "responses": '"delta":"Bonjour"',
    "anthropic": "thinking_delta",
}


@attrs.frozen
class Transcript:
    name: str
    path: str
    request: bytes
    body: bytes
    chunk_ends: tuple[int, ...]

    def chunks(self) -> list[bytes]:
        return _cut_at(self.body, self.chunk_ends)


def load(name: str) -> Transcript:
    entry = MANIFEST[name]
    return Transcript(
        name=name,
        path=entry["path"],
        request=orjson.dumps(entry["request"]),
        body=(STREAMS / f"{name}.sse").read_bytes(),
        chunk_ends=tuple(entry["chunk_ends"]),
    )


def cut_before_terminal(transcript: Transcript) -> Transcript:
    body = transcript.body
    end = body.rindex(TERMINALS[transcript.name])
    ends = tuple(e for e in transcript.chunk_ends if e < end) + (end,)
    return attrs.evolve(
        transcript, name=transcript.name + ".cut", body=body[:end], chunk_ends=ends
    )


def _cut_at(data: bytes, ends: Sequence[int]) -> list[bytes]:
    chunks, start = [], 0
    for end in ends:
        if end > start:
            chunks.append(data[start:end])
            start = end
    if start < len(data):
        chunks.append(data[start:])
    return chunks


def _random_chunks(data: bytes, seed: int, largest: int) -> list[bytes]:
    rng = random.Random(seed)
    chunks, start = [], 0
    while start < len(data):
        size = rng.randint(1, largest)
        chunks.append(data[start : start + size])
        start += size
    return chunks


def variants(transcript: Transcript) -> dict[str, list[bytes]]:
    body = transcript.body
    crlf = body.replace(b"\n", b"\r\n")
    return {
        "original": transcript.chunks(),
        "whole": [body],
        "single-bytes": [body[i : i + 1] for i in range(len(body))],
        **{f"random-{s}": _random_chunks(body, s, 40) for s in range(5)},
        "crlf": _random_chunks(crlf, 11, 7),
        "crlf-single-bytes": [crlf[i : i + 1] for i in range(len(crlf))],
        "cr": _random_chunks(body.replace(b"\n", b"\r"), 12, 9),
    }


def raw_upstream(chunks: Sequence[bytes]) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": message["type"] + ".complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        while (await receive()).get("more_body", False):
            pass
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        for chunk in chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            # Let each chunk go out on its own, as a provider's would.
            await trio.sleep(0.001 if len(chunks) < 500 else 0)
        await send({"type": "http.response.body", "body": b""})

    return app
