"""Tests that pin the public API, so that every addition is deliberate."""

from __future__ import annotations

import importlib
import importlib.metadata
from pathlib import Path

import pytest

import trio_llmproxy

EXPECTED_NAMES = [
    "BusStatistics",
    "CaptureSettings",
    "ClientError",
    "ConfigError",
    "Dispatcher",
    "Event",
    "EventBus",
    "HttpSink",
    "InMemoryEventBus",
    "InstrumentationMiddleware",
    "JsonlFileSink",
    "ProxyConfig",
    "ProxyError",
    "ProxyMetrics",
    "RedisEventBus",
    "RetryPolicy",
    "ServerHandle",
    "Sink",
    "SinkError",
    "StdoutSink",
    "SubscriberStatistics",
    "Subscription",
    "UpstreamError",
    "UpstreamTimeout",
    "WebSocketMessage",
    "WebSocketSession",
    "WebSocketSide",
    "create_app",
    "create_upstream_client",
    "note_outcome",
    "serve",
]


def test_all_is_the_expected_sorted_list() -> None:
    assert trio_llmproxy.__all__ == EXPECTED_NAMES
    assert EXPECTED_NAMES == sorted(EXPECTED_NAMES)


@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_public_name_is_importable_and_documented(name: str) -> None:
    module = importlib.import_module("trio_llmproxy")

    exported = getattr(module, name)

    assert exported.__doc__, f"{name} has no docstring"


def test_no_other_public_names_are_exported() -> None:
    # ``annotations`` is the ``from __future__`` import, not an export.
    public = {name for name in dir(trio_llmproxy) if not name.startswith("_")}

    assert public - {"annotations", "TYPE_CHECKING"} == set(EXPECTED_NAMES)


def test_version_matches_the_installed_distribution() -> None:
    assert trio_llmproxy.__version__ == importlib.metadata.version("trio_llmproxy")


def test_package_ships_type_information() -> None:
    assert (Path(trio_llmproxy.__file__).parent / "py.typed").is_file()
