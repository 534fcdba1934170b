"""Redaction of secrets in headers and URLs.

Every header list that reaches an event, a log line or a ``repr`` passes
through :func:`redact_headers`; every URL that may carry a password passes
through :func:`redact_url`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from urllib.parse import urlsplit, urlunsplit

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
    token = token.strip()
    tail = b""
    if len(token) >= _MIN_LENGTH_TO_SHOW_TAIL:
        tail = b"..." + token[-_TAIL_LENGTH:]
    prefix = scheme + b" " if scheme else b""
    return prefix + REDACTED + tail


def redact_headers(
    headers: Sequence[tuple[bytes, bytes]], secret_names: frozenset[bytes]
) -> list[tuple[bytes, bytes]]:
    """Return ``headers`` with the values of secret headers redacted.

    Names must already be lower case, as ASGI scopes and our response
    handling give them.
    """
    return [
        (name, redact_value(name, value)) if name in secret_names else (name, value)
        for name, value in headers
    ]


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
