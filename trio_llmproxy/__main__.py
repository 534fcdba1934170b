"""``python -m trio_llmproxy``: the same program as ``llm-proxy``."""

from __future__ import annotations

from ._cli import main

if __name__ == "__main__":
    main()
