"""Transparent instrumented streaming reverse proxy for OpenAI-compatible APIs."""
