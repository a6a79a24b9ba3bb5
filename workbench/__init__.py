"""Circuit Workbench: circuits of transformer language models, stored and queryable in DuckDB."""

__version__ = "0.1.0"
