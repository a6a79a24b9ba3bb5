"""The workbench's own pipelines. Each module declares its methods as `workbench.registry.Method`
values in `METHODS`, registered through the `workbench.methods` entry points (pyproject.toml);
the library never imports this package by name."""


def main(pipeline: str) -> None:
    """`python -m workbench.pipelines.<name> ...`: the same as `workbench run <name> ...`."""
    import sys

    from workbench.cli import cli

    sys.exit(cli(["run", pipeline, *sys.argv[1:]]))
