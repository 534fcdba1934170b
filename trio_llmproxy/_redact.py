"""Redaction of secrets in headers and URLs.

Every header list that reaches an event, a log line or a ``repr`` passes
through :func:`redact_headers`; every URL that may carry a password passes
through :func:`redact_url`; every query string that reaches an event passes
through :func:`redact_query`. Keys carried as WebSocket subprotocols (OpenAI
Realtime's browser authentication, ``openai-insecure-api-key.KEY``) are
redacted in ``Sec-WebSocket-Protocol`` by :func:`redact_headers` and, when
an upstream picks one, by :func:`redact_subprotocol`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final
from urllib.parse import unquote, urlsplit, urlunsplit

DEFAULT_SECRET_HEADERS: frozenset[str] = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "api-key",
        "x-api-key",
        "cookie",
        "set-cookie",
    }
)
REDACTED = b"[REDACTED]"

# Headers whose values are keys or bearer tokens: they keep their last four
# characters, enough to tell two keys apart in a log and useless to an
# attacker. Cookies and other secrets are replaced whole.
_KEY_HEADERS = frozenset(
    {b"authorization", b"proxy-authorization", b"api-key", b"x-api-key"}
)
# A shorter secret would give away too large a share of itself.
_MIN_LENGTH_TO_SHOW_TAIL = 16
_TAIL_LENGTH = 4
# Subprotocol tokens that carry a key after this prefix: OpenAI's Realtime
# API takes a browser's key this way, as browsers cannot set Authorization
# on a WebSocket handshake.
_KEY_SUBPROTOCOL_PREFIXES: Final = ("openai-insecure-api-key.",)
_SUBPROTOCOL_HEADER: Final = b"sec-websocket-protocol"
# Query parameters whose values are keys or tokens (compared in lower case,
# after percent-decoding the name).
SECRET_QUERY_PARAMETERS: Final = frozenset(
    {"api_key", "api-key", "key", "access_token", "token"}
)


def secret_header_names(extra: Iterable[str] = ()) -> frozenset[bytes]:
    """Return the lower-case header names to redact: the defaults plus ``extra``."""
    names = set(DEFAULT_SECRET_HEADERS)
    names.update(name.strip().lower() for name in extra)
    return frozenset(name.encode("latin-1") for name in names if name)


def redact_value(name: bytes, value: bytes) -> bytes:
    """Return what stands in for the secret ``value`` of header ``name``."""
    if name not in _KEY_HEADERS:
        return REDACTED
    scheme, sep, token = value.partition(b" ")
    if not sep:
        scheme, token = b"", value
    elif scheme.lower() != b"bearer":
        # Basic credentials and unknown schemes: nothing of them is shown.
        return scheme + b" " + REDACTED
    prefix = scheme + b" " if scheme else b""
    return prefix + _redact_key(token.strip())


def _redact_key(key: bytes) -> bytes:
    """``[REDACTED]``, and the key's last four characters if it is long enough."""
    if len(key) >= _MIN_LENGTH_TO_SHOW_TAIL:
        return REDACTED + b"..." + key[-_TAIL_LENGTH:]
    return REDACTED


def redact_subprotocol(token: str) -> str:
    """Return the subprotocol ``token``, with the key it may carry redacted.

    ``openai-insecure-api-key.sk-...WXYZ`` becomes
    ``openai-insecure-api-key.[REDACTED]...WXYZ``; other tokens are returned
    as they are.
    """
    lowered = token.lower()
    for prefix in _KEY_SUBPROTOCOL_PREFIXES:
        if lowered.startswith(prefix):
            key = token[len(prefix) :].encode("latin-1", "replace")
            return token[: len(prefix)] + _redact_key(key).decode("latin-1")
    return token


def _redact_subprotocols(value: bytes) -> bytes:
    if b"." not in value:
        # Fast path: no token of the form PREFIX.KEY at all.
        return value
    tokens = value.decode("latin-1").split(",")
    redacted = []
    for token in tokens:
        stripped = token.strip()
        cut = token.find(stripped)
        redacted.append(
            token[:cut] + redact_subprotocol(stripped) + token[cut + len(stripped) :]
        )
    return ",".join(redacted).encode("latin-1")


def redact_headers(
    headers: Sequence[tuple[bytes, bytes]], secret_names: frozenset[bytes]
) -> list[tuple[bytes, bytes]]:
    """Return ``headers`` with the values of secret headers redacted.

    Names must already be lower case, as ASGI scopes and our response
    handling give them. Keys offered as WebSocket subprotocols in
    ``sec-websocket-protocol`` are redacted too (see
    :func:`redact_subprotocol`); the other tokens of that header are kept.
    """
    return [
        (name, redact_value(name, value))
        if name in secret_names
        else (name, _redact_subprotocols(value))
        if name == _SUBPROTOCOL_HEADER
        else (name, value)
        for name, value in headers
    ]


def redact_query(query: str) -> str:
    """Return ``query`` with the values of secret parameters redacted.

    The parameters of :data:`SECRET_QUERY_PARAMETERS` (``api_key``, ``key``,
    ``token`` and the like) have their values replaced as keys in headers
    are: ``[REDACTED]``, with the last four characters of a value of 16 or
    more. Everything else is kept byte for byte.
    """
    if "=" not in query:
        return query
    fields = query.split("&")
    changed = False
    for index, field in enumerate(fields):
        name, sep, value = field.partition("=")
        if sep and value and unquote(name).lower() in SECRET_QUERY_PARAMETERS:
            # The tail is the raw value's, so nothing the query did not
            # already hold (an escaped "&", say) appears in it.
            redacted = _redact_key(value.encode("latin-1", "replace"))
            fields[index] = name + "=" + redacted.decode("latin-1")
            changed = True
    return "&".join(fields) if changed else query


def redact_url(url: str) -> str:
    """Return ``url`` with any password replaced, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    netloc = f"{user}:***@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
