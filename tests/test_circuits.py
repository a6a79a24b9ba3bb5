"""Circuits: selection keeps input -> logits paths; faithfulness by edge ablation is 1 for the
full graph, 0 for the empty circuit, and equals a direct intervention for one removed edge; the
zoo's induction circuit is found and is faithful."""

import dataclasses

import pytest
import torch

from tests.attribution.test_edges import _moved_metric, _source_delta
from workbench import circuits
from workbench.attribution import edges
from workbench.attribution.batches import logit_diff, make_batches
from workbench.models import load_checkpoint, resolve_checkpoints
from workbench.tasks import load_task


@pytest.fixture(scope="module")
def gpt2(tiny_hf_dirs):
    loaded = load_checkpoint(resolve_checkpoints(str(tiny_hf_dirs["gpt2"]))[0])
    return loaded.model, make_batches(load_task("induction", loaded, n_prompts=6))


def test_selection_keeps_only_paths_from_input_to_logits():
    scored = [
        ("input", "a0.h0<k>", 0.9),
        ("a0.h0", "a1.h1<q>", 0.8),
        ("a1.h1", "logits", 0.7),
        ("a0.h3", "logits", 0.6),  # a0.h3 is not fed from input in the selection
        ("input", "a1.h2<v>", 0.5),  # a1.h2 does not reach logits
        ("input", "logits", -0.05),
    ]
    top = circuits.select(scored, "top:5")
    assert {(s, d) for s, d, _ in top.edges} == {
        ("input", "a0.h0<k>"), ("a0.h0", "a1.h1<q>"), ("a1.h1", "logits"),
    }  # fmt: skip
    assert top.nodes == {"input", "a0.h0", "a1.h1", "logits"}
    assert len(circuits.select(scored, "threshold:0.01").edges) == 4
    with pytest.raises(ValueError, match="top:N or threshold:X"):
        circuits.select(scored, "best:3")


def test_full_graph_is_faithful_and_empty_circuit_is_not(gpt2):
    model, batches = gpt2
    graph = edges.model_graph(model)
    everything = graph.edges(torch.ones(len(graph.sources), len(graph.destinations)))
    assert circuits.faithfulness(model, batches, graph, everything) == pytest.approx(1.0, abs=1e-4)
    assert circuits.faithfulness(model, batches, graph, []) == pytest.approx(0.0, abs=1e-4)


@pytest.mark.parametrize(("src", "dst"), [("m0", "a1.h1<v>"), ("a0.h2", "m0"), ("input", "logits")])
def test_removing_one_edge_is_a_direct_intervention(gpt2, src, dst):
    model, batches = gpt2
    batch = batches[0]
    graph = edges.model_graph(model)
    everything = graph.edges(torch.ones(len(graph.sources), len(graph.destinations)))
    kept = [e for e in everything if (e[0], e[1]) != (src, dst)]
    faith = circuits.faithfulness(model, batches, graph, kept)
    with torch.no_grad():
        m_clean = float(logit_diff(model(batch.clean), batch.answer, batch.wrong).mean())
        m_corr = float(logit_diff(model(batch.corrupt), batch.answer, batch.wrong).mean())
    # the clean run with dst's input moved by src_corrupt - src_clean
    delta = -_source_delta(model, batch, src)
    moved = _moved_metric(model, dataclasses.replace(batch, corrupt=batch.clean), dst, delta)
    assert faith == pytest.approx((moved - m_corr) / (m_clean - m_corr), abs=1e-4)


def test_acdc_prunes_greedily_and_its_circuit_is_as_faithful_as_reported(gpt2):
    model, batches = gpt2
    graph = edges.model_graph(model)
    tried, kept, final = circuits.acdc(circuits.EdgeAblator(model, batches, graph), threshold=0.02)
    assert len(tried) == graph.n_edges  # every edge tried once
    kept_pairs = {(s, d) for s, d, _ in kept}
    removed_drops = [drop for s, d, drop in tried if (s, d) not in kept_pairs]
    assert all(drop < 0.02 for drop in removed_drops)
    assert len(kept) < graph.n_edges
    recomputed = circuits.faithfulness(model, batches, graph, kept)
    assert recomputed == pytest.approx(final, abs=1e-4)
