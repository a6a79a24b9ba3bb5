"""What a method returns, as plain values: a `RunResult` (with its `CircuitResult`). Only the
store's side (`workbench.rows`, `Store.write_run`) turns it into table rows."""

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pyarrow as pa

from workbench.core import Edge

if TYPE_CHECKING:
    from workbench.spotcheck import SpotCheck

NodeScore = tuple[str, int | None, float]  # (node id, position or None for all, score)
CurvePoint = tuple[int, int, float]  # (edges requested, edges kept, faithfulness)


@dataclass
class CircuitResult:
    """The circuit a run selects from its scores."""

    name: str
    rule: str
    edges: list[Edge]
    n_nodes: int
    faithfulness: float
    # the faithfulness's spread over bootstrap resamples of the prompts (`faithfulness_sd`,
    # `faithfulness_lo`, `faithfulness_hi`), stored among the run's metrics
    spread: dict[str, float] = field(default_factory=dict)


@dataclass
class RunResult:
    """What one run of a method computed, returned by `Method.compute`. The metric on the clean
    and corrupt prompts goes on the run's `runs` row; the rest become rows of the run's own
    tables (`node_scores`, `edges`, `faithfulness_curves`, `run_metrics`, `circuits` and
    `circuit_edges`, and `tables`), all written in the run's one transaction."""

    metric_clean: float | None = None
    metric_corrupt: float | None = None
    node_scores: list[NodeScore] = field(default_factory=list)
    edges: list[Edge] = field(default_factory=list)
    # standard errors over prompts, parallel to `node_scores` and `edges` (None: not computed)
    node_stderr: list[float] | None = None
    edge_stderr: list[float] | None = None
    # the run's scores measured again by real interventions (`spot_checks`, and its summary
    # among the run's metrics)
    spot_check: "SpotCheck | None" = None
    curve: list[CurvePoint] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    circuit: CircuitResult | None = None
    # rows of the run's own SAE tables (`saes`, `features`, `feature_examples`), without run_id
    tables: dict[str, pa.Table] = field(default_factory=dict)
    # nodes the run introduces (an SAE's features), inserted where new
    nodes: pa.Table | None = None
    # files the run made: staged path -> final path, moved into place only when the run commits
    files: dict[str, str] = field(default_factory=dict)
