"""Runnable pipeline definitions: each module has `run(cfg) -> outcomes` and `main(argv)`."""

PIPELINES = ("heads", "patching", "edges")
