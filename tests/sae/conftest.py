"""SAE fixtures (defined with the other session fixtures in `tests/conftest.py`)."""

from tests.conftest import CORPUS_TOKENS, HOOKS, SaeRun, query

__all__ = ["CORPUS_TOKENS", "HOOKS", "SaeRun", "query"]
