"""Influence, pruning and the replacement and completeness scores of an attribution graph, on
its adjacency matrix as a NumPy array (no torch: the app prunes stored graphs with it).

The adjacency is `[target, source]` over the nodes in the order [features | errors | tokens |
logits]; `offsets` gives where errors, tokens and logits start. With `Â` the adjacency with
rows normalised to |weights| summing to 1 and `w` the logit probabilities (zero but on the
logit nodes), a node's influence is `(w Â + w Â² + …)` at that node. Pruning keeps nodes in
order of influence until their cumulative share reaches `node_threshold` (tokens and logits
always), then edges of the kept nodes by `Â[t, s] · (influence[t] + w[t])` up to
`edge_threshold`, and drops features and errors left without an edge out, and features left
without an edge in. The replacement score is the share of token influence in token plus error
influence; the completeness score is the influence-weighted share of the nodes' inputs that do
not come from errors.
"""

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Offsets:
    """Where each kind of node starts in the adjacency (features start at 0)."""

    error: int
    token: int
    logit: int

    @classmethod
    def of_kinds(cls, kinds: list[str]) -> "Offsets":
        """From the nodes' kinds in adjacency order."""
        first = {k: kinds.index(k) if k in kinds else None for k in ("error", "token", "logit")}
        end = len(kinds)
        logit = first["logit"] if first["logit"] is not None else end
        token = first["token"] if first["token"] is not None else logit
        error = first["error"] if first["error"] is not None else token
        return cls(error, token, logit)


@dataclass
class Pruned:
    """Which nodes and edges a pruning keeps (`edge_mask[target, source]`), each node's
    influence, and its cumulative influence share (the share of all influence held by the
    nodes at least as influential: smaller is more; 0 for logits)."""

    node_mask: np.ndarray
    edge_mask: np.ndarray
    influence: np.ndarray
    cumulative: np.ndarray


def normalise(adjacency: np.ndarray) -> np.ndarray:
    """|A| with each row scaled to sum to 1 (rows of zeros stay zero)."""
    a = np.abs(adjacency)
    return a / np.maximum(a.sum(axis=1, keepdims=True), 1e-10)


def influence(normalised: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """`w Â + w Â² + …`: each node's total influence on the weighted targets (a DAG, so the
    series ends)."""
    total = np.zeros_like(weights)
    current = weights @ normalised
    for _ in range(10_000):
        if not current.any():
            return total
        total = total + current
        current = current @ normalised
    raise ValueError("the adjacency matrix has a cycle")


def threshold(scores: np.ndarray, share: float) -> float:
    """The smallest score among the largest ones that together hold `share` of the total."""
    ordered = np.sort(scores.ravel())[::-1]
    total = ordered.sum()
    if total <= 0:
        return float("inf")
    cumulative = np.cumsum(ordered) / total
    return float(ordered[min(int(np.searchsorted(cumulative, share)), len(ordered) - 1)])


def prune(
    adjacency: np.ndarray,
    logit_weights: np.ndarray,
    offsets: Offsets,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
) -> Pruned:
    a = np.asarray(adjacency, dtype=np.float64)
    w = np.asarray(logit_weights, dtype=np.float64)
    n_logits = len(w) - offsets.logit
    node_influence = influence(normalise(a), w)
    node_mask = node_influence >= threshold(node_influence, node_threshold)
    node_mask[offsets.token :] = True
    kept = a * node_mask[:, None] * node_mask[None, :]
    kept_normalised = normalise(kept)
    edge_scores = kept_normalised * (influence(kept_normalised, w) + w)[:, None]
    edge_mask = edge_scores >= threshold(edge_scores, edge_threshold)
    edge_mask &= kept != 0
    is_feature = np.zeros_like(node_mask)
    is_feature[: offsets.error] = True
    may_go = np.zeros_like(node_mask)
    may_go[: offsets.token] = True
    while True:
        has_out = edge_mask.any(axis=0)
        has_in = edge_mask.any(axis=1)
        drop = node_mask & may_go & (~has_out | (is_feature & ~has_in))
        if not drop.any():
            break
        node_mask &= ~drop
        edge_mask &= node_mask[:, None] & node_mask[None, :]
    order = np.argsort(-node_influence, kind="stable")
    cumulative = np.zeros_like(node_influence)
    total = node_influence.sum()
    if total > 0:
        cumulative[order] = np.cumsum(node_influence[order]) / total
    cumulative[len(cumulative) - n_logits :] = 0
    return Pruned(node_mask, edge_mask, node_influence, cumulative)


def scores(
    adjacency: np.ndarray, logit_weights: np.ndarray, offsets: Offsets
) -> tuple[float, float]:
    """(replacement score, completeness score) of an unpruned graph."""
    a = np.asarray(adjacency, dtype=np.float64)
    w = np.asarray(logit_weights, dtype=np.float64)
    normalised = normalise(a)
    node_influence = influence(normalised, w)
    token_inf = node_influence[offsets.token : offsets.logit].sum()
    error_inf = node_influence[offsets.error : offsets.token].sum()
    replacement = float(token_inf / (token_inf + error_inf)) if token_inf + error_inf > 0 else 1.0
    non_error = 1 - normalised[:, offsets.error : offsets.token].sum(axis=1)
    non_error[np.abs(a).sum(axis=1) == 0] = 1
    out = node_influence + w
    return replacement, float((non_error * out).sum() / out.sum())
