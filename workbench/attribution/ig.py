"""Riemann rules for integrated gradients (Sundararajan et al. 2017), shared by every method that
integrates a gradient along the straight path from the corrupt to the clean input.

The attribution of an input `x` is `(x_clean - x_corrupt) . integral_0^1 grad m(x(alpha)) dalpha`
with `x(alpha) = x_corrupt + alpha (x_clean - x_corrupt)`. The integral is estimated from `N`
gradients at the points `alpha_k`:

* `left`: `alpha = k / N`, k = 0..N-1. Starts at the corrupt run; what the EAP-IG authors'
  code (Hanna et al. 2024) computes, so published numbers can be reproduced exactly.
* `right`: `alpha = k / N`, k = 1..N. Ends at the clean run; the workbench's default until
  2026-12-05 (a run stored with it keeps its key, and `--ig-rule right` reproduces it).
* `midpoint`: `alpha = (k - 1/2) / N`, k = 1..N. Same cost, error O(1/N^2) instead of O(1/N)
  for a smooth integrand: the most accurate of the three (10-60x closer to exact than `right`
  at every step count, `benchmarks/bench_ig_rules.py`), and the default.

Completeness (the scores of all inputs add up to `m_clean - m_corrupt`, i.e. to 1 once
normalised by the gap) holds exactly only in the limit; the stored `ig_completeness` of a run is
how close its own sum came.
"""

from dataclasses import dataclass

from workbench.errors import BadInput
from workbench.registry import option

IG_RULES = ("left", "right", "midpoint")
DEFAULT_IG_RULE = "midpoint"
DEFAULT_IG_STEPS = 5


@dataclass(frozen=True)
class IgParams:
    """The options of every method that integrates gradients (eap_ig, sae_attr)."""

    ig_steps: int = option(DEFAULT_IG_STEPS, "Interpolation steps of integrated gradients.")
    ig_rule: str = option(
        DEFAULT_IG_RULE,
        "Riemann rule of those steps: midpoint (k-1/2 for k=1..N, the most accurate; default), "
        "right (k=1..N, the default of runs stored before 2026-12-05) or left (k=0..N-1, as "
        "the EAP-IG authors' code).",
        choices=IG_RULES,
    )


def check_ig_params(params: IgParams, min_steps: int = 1) -> None:
    if params.ig_steps < min_steps:
        raise BadInput(f"--ig-steps {params.ig_steps}: must be at least {min_steps}")
    check_ig_rule(params.ig_rule)


def check_ig_rule(rule: str) -> None:
    if rule not in IG_RULES:
        raise BadInput(f"--ig-rule {rule}: expected one of {', '.join(IG_RULES)}")


def ig_alphas(steps: int, rule: str = DEFAULT_IG_RULE) -> list[float]:
    """The interpolation points of `steps` gradients under `rule`; `steps = 0` is plain
    attribution patching (one gradient, at the corrupt run)."""
    if rule not in IG_RULES:
        raise ValueError(f"unknown integrated-gradients rule {rule!r} ({', '.join(IG_RULES)})")
    if steps < 0:
        raise ValueError(f"integrated-gradients steps must be >= 0, got {steps}")
    if steps == 0:
        return [0.0]
    if rule == "left":
        return [k / steps for k in range(steps)]
    if rule == "right":
        return [k / steps for k in range(1, steps + 1)]
    return [(k - 0.5) / steps for k in range(1, steps + 1)]
