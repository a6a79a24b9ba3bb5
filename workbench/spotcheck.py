"""Spot checks: an approximate method's scores measured again by real interventions.

`attr_patch`, `eap`, `eap_ig` and `sae_attr` estimate what patching would do from gradients.
With `--spot-checks N` (8 by default for `eap_ig`, 0 for the others: `DEFAULT_SIZE`) a run
also patches, for real, `N` of the items it scored:
the `ceil(N / 2)` of largest |score| and a seeded random draw from the rest, so that a check sees
both what the circuit is built from and what the method called negligible. Each item's exact
score is what the method approximates, normalised by the same clean-vs-corrupt gap:

* `eap`, `eap_ig`: exact edge patching (`exact_edge`): the corrupt run with the destination's
  input moved by the source's clean-minus-corrupt output;
* `attr_patch`: exact denoising of the head's output (`act_patch_denoise`);
* `sae_attr`: the corrupt run with the feature (or error node) set to its clean value, every
  SAE spliced in.

Stored per run: the sample (`spot_checks`: each item, whether it came from the top or the random
draw, the method's estimate and the exact score) and, among the run's metrics, `spot_n`,
`spot_spearman` (rank correlation of estimate and exact, ties at their mean rank; absent when
either side is constant), `spot_mae` (mean absolute difference: both are fractions of the gap)
and `spot_sign_agreement` (the share of items whose estimate has the exact score's sign). Values
smaller than `NEGLIGIBLE` (a fraction of the gap, as every score is) count as 0 in the ranks and
the signs: an edge the method and the patch both find negligible agrees, whatever the sign of
its float noise. A run
whose check rank-correlates below `CONTRADICTED_SPEARMAN` or agrees in sign on fewer than
`CONTRADICTED_SIGNS` of its items is *contradicted* by its check (the app's badge).

No torch here: the store's side reads these values; `workbench.attribution.spotcheck`
computes them.
"""

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from workbench.errors import BadInput
from workbench.registry import option

DEFAULT_SPOT_CHECKS = 8
SPOT_SEED = 0

NEGLIGIBLE = 1e-4  # |score| below this (a fraction of the gap) is 0 in ranks and signs

# below either, a run's spot check contradicts its scores
CONTRADICTED_SPEARMAN = 0.5
CONTRADICTED_SIGNS = 0.75


def sample_items(scores: list[float], n: int, seed: int = SPOT_SEED) -> list[tuple[int, str]]:
    """(index into `scores`, "top" or "random") of the items a spot check of size `n`
    measures: the `ceil(n / 2)` of largest |score| (ties: the earlier first), then a random draw
    (seeded) from the rest; every item when `n` is at least their number."""
    if n <= 0 or not scores:
        return []
    order = sorted(range(len(scores)), key=lambda i: (-abs(scores[i]), i))
    n_top = min(math.ceil(n / 2), len(order))
    chosen = [(i, "top") for i in order[:n_top]]
    rest = np.array(order[n_top:], dtype=np.int64)
    n_random = min(n - n_top, len(rest))
    if n_random:
        rng = np.random.default_rng(seed)
        picked = np.sort(rng.choice(rest, size=n_random, replace=False))
        chosen += [(int(i), "random") for i in picked]
    return chosen


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 1, tied values at their mean rank."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(1, len(values) + 1)
    for value in np.unique(values):
        tied = values == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation (ties at their mean rank); None when either side is
    constant or there are fewer than 2 values."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(x) < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return None
    return float(np.corrcoef(_ranks(x), _ranks(y))[0, 1])


@dataclass(frozen=True)
class SpotCheck:
    """A run's spot check: per item, its node (node scores) or its source and destination
    (edge scores), the draw it came from, the method's estimate and the exact score."""

    nodes: list[str | None]
    srcs: list[str | None]
    dsts: list[str | None]
    samples: list[str]
    estimates: list[float]
    exact: list[float]

    def rows(self) -> pa.Table:
        """Rows of `spot_checks` (without `run_id`, which the store fills in)."""
        return pa.table(
            {
                "node_id": pa.array(self.nodes, pa.string()),
                "src": pa.array(self.srcs, pa.string()),
                "dst": pa.array(self.dsts, pa.string()),
                "sample": pa.array(self.samples, pa.string()),
                "estimate": pa.array(self.estimates, pa.float64()),
                "exact": pa.array(self.exact, pa.float64()),
            }
        )

    def summary(self) -> dict[str, float]:
        """The run's metrics from its check (see the module docstring)."""
        est = np.asarray(self.estimates, dtype=np.float64)
        ex = np.asarray(self.exact, dtype=np.float64)
        if not len(est):
            return {}
        est_r, ex_r = _rounded(est), _rounded(ex)
        out = {
            "spot_n": float(len(est)),
            "spot_mae": float(np.abs(est - ex).mean()),
            "spot_sign_agreement": float((np.sign(est_r) == np.sign(ex_r)).mean()),
        }
        rho = spearman(est_r.tolist(), ex_r.tolist())
        if rho is not None:
            out["spot_spearman"] = rho
        return out


def _rounded(values: np.ndarray) -> np.ndarray:
    return np.where(np.abs(values) < NEGLIGIBLE, 0.0, values)


def contradicted(metrics: dict[str, float]) -> bool:
    """Whether a run's spot check (its `run_metrics`) contradicts its scores."""
    rho, signs = metrics.get("spot_spearman"), metrics.get("spot_sign_agreement")
    return (rho is not None and rho < CONTRADICTED_SPEARMAN) or (
        signs is not None and signs < CONTRADICTED_SIGNS
    )


def node_check(
    nodes: list[str], samples: list[str], estimates: list[float], exact: list[float]
) -> SpotCheck:
    none: list[str | None] = [None] * len(nodes)
    return SpotCheck(list(nodes), none, list(none), samples, estimates, exact)


def edge_check(
    edges: list[tuple[str, str]], samples: list[str], estimates: list[float], exact: list[float]
) -> SpotCheck:
    none: list[str | None] = [None] * len(edges)
    return SpotCheck(none, [e[0] for e in edges], [e[1] for e in edges], samples, estimates, exact)


@dataclass(frozen=True)
class SpotParams:
    """The option of every method a spot check qualifies."""

    spot_checks: int | None = option(
        None,
        "Scores measured again by real patching: half the largest, half drawn at random from "
        "the rest (0: none; default: 8 for eap_ig, where that costs under a tenth of the run, "
        "0 for eap, attr_patch and sae_attr).",
    )


# the size of a method's check when --spot-checks is not given: on where a check of 8 costs at
# most 10 % of the run (benchmarks/bench_reliability.py: eap_ig 6 %, eap 13-18 %, attr_patch
# 68-127 %; sae_attr's, 8 forward passes of the spliced model, is not measured yet)
DEFAULT_SIZE = {"eap_ig": DEFAULT_SPOT_CHECKS}


def spot_size(params: SpotParams, method: str) -> int:
    """How many scores a run of `method` checks."""
    if params.spot_checks is not None:
        return params.spot_checks
    return DEFAULT_SIZE.get(method, 0)


def spot_key(size: int) -> dict[str, int]:
    """The run key's share of the check: nothing for 0, so that a run without a check keeps
    the key it had before checks existed."""
    return {"spot_checks": size} if size else {}


def check_spot_params(params: SpotParams) -> None:
    if params.spot_checks is not None and params.spot_checks < 0:
        raise BadInput(f"--spot-checks {params.spot_checks}: must be 0 or more")
