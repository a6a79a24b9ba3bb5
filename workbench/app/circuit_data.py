"""What the Circuit page draws, whatever its source (an edge run, a stored circuit, two compared,
a saved subgraph): the edges, the checkpoint they belong to and how to show them."""

from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

from workbench.app.figures import Edge


@dataclass
class Shown:
    """What a source of edges hands the explorer: the edges and where they come from."""

    edges: list[Edge]
    checkpoint_id: str
    colours: dict[tuple[str, str], str] | None = None
    after: Callable[[], None] | None = None  # drawn below the graph (tables, curves)
    source: str = ""  # where the edges come from (`run:<id>`, `circuit:<id>`, ...)
    groups: dict[str, list[str]] | None = None  # supernodes drawn in place of their members
    own_edges: list[Edge] | None = None  # what curating works on, when not the drawn edges


def triples(edges: pd.DataFrame) -> list[Edge]:
    """The (src, dst, score) of each row of a query's edges."""
    return [(str(r.src), str(r.dst), float(r.score)) for r in edges.itertuples()]
