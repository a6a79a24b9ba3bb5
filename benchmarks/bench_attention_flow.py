"""Attention flow (Abnar & Zuidema 2020): networkx's maximum flow, one problem at a time on the
whole layered graph, against `workbench.prompt.views.attention_flow` (SciPy's Dinic on the part
of the layered graph each problem can use, capacities floored to multiples of 2^-30).

Random causal attention of SmolLM2-135M's shape (9 heads, averaged into Â) at 2 x 64, 2 x 128
and 4 x 128 (layers x tokens) for both, measured in the same run, with the largest difference
between them; then 30 x 128 (SmolLM2's 30 layers) for the new one only: networkx grows with
layers² x tokens³ and would take hours there.

    python -m benchmarks.bench_attention_flow [--no-networkx]
"""

import argparse
import os
import time
import warnings

import networkx as nx
import numpy as np
import torch

from workbench.prompt.views import attention_flow, residual_attention

os.environ.setdefault("TQDM_DISABLE", "1")
warnings.filterwarnings("ignore")

HEADS = 9  # SmolLM2-135M
BOTH = ((2, 64), (2, 128), (4, 128))  # (layers, tokens) timed with networkx too
NEW_ONLY = ((30, 128),)


def random_patterns(n_layers: int, n: int, *, seed: int = 0) -> torch.Tensor:
    """[layer, head, q, k]: softmax of Gaussian scores (scale 2) under a causal mask."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(n_layers, HEADS, n, n, generator=gen) * 2
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(-1)


def networkx_flow(patterns: torch.Tensor) -> np.ndarray:
    """The baseline: the layered graph with capacities Â, one networkx maximum flow per (layer,
    input position) to the last position after that layer."""
    mixed = residual_attention(patterns).double()
    n_layers, n = mixed.shape[0], mixed.shape[-1]
    graph = nx.DiGraph()
    for layer in range(n_layers):
        for q in range(n):
            for k in range(q + 1):
                weight = float(mixed[layer, q, k])
                if weight > 0:
                    graph.add_edge((layer, k), (layer + 1, q), capacity=weight)
    flow = np.zeros((n_layers, n))
    for layer in range(n_layers):
        for source in range(n):
            flow[layer, source] = nx.maximum_flow_value(graph, (0, source), (layer + 1, n - 1))
    return flow


def say(line: str) -> None:
    print(line, flush=True)


def timed(fn, patterns: torch.Tensor) -> tuple[np.ndarray, float]:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    out = np.asarray(fn(patterns))
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-networkx", action="store_true", help="Time the new flow only.")
    args = parser.parse_args()
    say(f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    say(f"{'layers x tokens':>16} {'networkx s':>11} {'new s':>8} {'ratio':>7} {'max diff':>9}")
    for n_layers, n in BOTH + NEW_ONLY:
        patterns = random_patterns(n_layers, n)
        new, new_s = timed(lambda p: attention_flow(p).numpy(), patterns)
        if args.no_networkx or (n_layers, n) in NEW_ONLY:
            say(f"{n_layers:>7} x {n:<6} {'-':>11} {new_s:>8.2f} {'-':>7} {'-':>9}")
            continue
        old, old_s = timed(networkx_flow, patterns)
        diff, ratio = np.abs(old - new).max(), old_s / new_s
        say(f"{n_layers:>7} x {n:<6} {old_s:>11.1f} {new_s:>8.2f} {ratio:>6.0f}x {diff:>9.1e}")
    say(f"load average after {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
