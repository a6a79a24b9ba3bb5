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


def test_path_pruning_equals_graph_reachability_on_random_edge_sets():
    """Pruning to input -> logits paths keeps exactly the edges whose ends networkx finds both
    reachable from the input and reaching the logits, in their order, on random edge sets of a
    4-layer graph (q/k/v ports folded into their head)."""
    import random

    import networkx as nx

    from workbench.graph import split_port

    rng = random.Random(0)
    heads = [f"a{layer}.h{h}" for layer in range(4) for h in range(3)]
    sources = ["input", *heads]
    dests = [f"{h}<{p}>" for h in heads for p in "qkv"] + ["logits"]
    nontrivial = 0
    for trial in range(200):
        every = [(s, d, rng.uniform(-1, 1)) for s in sources for d in dests]
        chosen = rng.sample(every, rng.randint(0, 60))
        graph = nx.DiGraph((s, split_port(d)[0]) for s, d, _ in chosen)
        if "input" in graph and "logits" in graph:
            keep = (nx.descendants(graph, "input") | {"input"}) & (
                nx.ancestors(graph, "logits") | {"logits"}
            )
        else:
            keep = set()
        expected = [e for e in chosen if e[0] in keep and split_port(e[1])[0] in keep]
        assert circuits.on_input_to_logits_paths(chosen) == expected, trial
        nontrivial += 0 < len(expected) < len(chosen)
    assert nontrivial >= 20  # cases where some edges are kept and some pruned


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
    ablator = circuits.EdgeAblator(model, batches, graph)
    valid = graph.valid.float()
    everything = graph.edges(torch.ones(len(graph.sources), len(graph.destinations)))
    assert circuits.faithfulness(model, batches, graph, everything) == 1.0  # by definition
    assert circuits.faithfulness(model, batches, graph, []) == 0.0
    # ... which the ablated passes the curve skips would give: the clean and the corrupt run
    nothing_removed, all_removed = torch.zeros_like(valid), valid
    totals, each = ablator._metric_totals(torch.stack([nothing_removed, all_removed]), 64, None)
    assert float(totals[0]) / ablator.n == pytest.approx(ablator.m_clean, abs=1e-5)
    assert float(totals[1]) / ablator.n == pytest.approx(ablator.m_corrupt, abs=1e-5)
    # per prompt too: what a bootstrap over prompts resamples
    assert torch.allclose(each[0], ablator.runs.clean_values, atol=1e-5)
    assert torch.allclose(each[1], ablator.runs.corrupt_values, atol=1e-5)


def test_keeping_one_input_edge_is_that_edge_patched_into_the_corrupt_run(gpt2):
    """Every other edge removed: each destination but one reads the corrupt residual stream
    (the ablation's `total` of every upstream source's move), and the kept edge's destination
    reads it moved by the clean embeddings' difference: exact patching of that edge."""
    model, batches = gpt2
    batch = batches[0]
    graph = edges.model_graph(model)
    with torch.no_grad():
        m_clean, m_corr = (
            float(logit_diff(model(tokens), batch.answer, batch.wrong).mean())
            for tokens in (batch.clean, batch.corrupt)
        )
    delta = _source_delta(model, batch, "input")
    for dst in ("a1.h3<q>", "m1", "logits"):
        faith = circuits.faithfulness(model, batches, graph, [("input", dst, 1.0)])
        moved = _moved_metric(model, batch, dst, delta)
        assert faith == pytest.approx((moved - m_corr) / (m_clean - m_corr), abs=1e-4)


def test_the_curve_reuses_the_attributions_corrupt_runs_and_any_pass_size(gpt2):
    model, batches = gpt2
    graph = edges.model_graph(model)
    scored = edges.edge_attribution(model, batches)
    fresh = circuits.corrupt_runs(model, batches, graph)
    assert scored.runs is not None
    assert scored.runs.m_clean == pytest.approx(fresh.m_clean, abs=1e-6)
    assert scored.runs.m_corrupt == pytest.approx(fresh.m_corrupt, abs=1e-6)
    for mine, theirs in zip(scored.runs.sources, fresh.sources, strict=True):
        assert mine.keys() == theirs.keys()
        for name in mine:
            torch.testing.assert_close(mine[name], theirs[name], atol=1e-6, rtol=1e-6)
    edge_list = scored.edges()
    reused = circuits.faithfulness_curve(model, batches, graph, edge_list, runs=scored.runs)
    one_copy = circuits.faithfulness_curve(model, batches, graph, edge_list, max_tokens=1)
    assert [(n, k) for n, k, _ in reused] == [(n, k) for n, k, _ in one_copy]
    for (_, _, a), (_, _, b) in zip(reused, one_copy, strict=True):
        assert a == pytest.approx(b, abs=1e-5)


def test_projections_every_head_replaces_are_skipped_without_changing_a_bit(gpt2, monkeypatch):
    """A pass leaves uncomputed the q/k/v projections whose every head of every copy it
    replaces; the curve is bit for bit the one that computes them all, and some were skipped."""
    from contextlib import contextmanager

    model, batches = gpt2
    graph = edges.model_graph(model)
    scored = edges.edge_attribution(model, batches)
    edge_list = scored.edges()
    skipped = []
    original = circuits._projections_skipped

    @contextmanager
    def counting(model, ports):
        skipped.append(sum(len(p) for p in ports.values()))
        with original(model, ports):
            yield

    monkeypatch.setattr(circuits, "_projections_skipped", counting)
    fast = circuits.faithfulness_curve(model, batches, graph, edge_list, runs=scored.runs)
    assert sum(skipped) > 0 and len([v for _, _, v in fast if v not in (0.0, 1.0)]) > 0

    @contextmanager
    def computing(model, ports):
        yield

    monkeypatch.setattr(circuits, "_projections_skipped", computing)
    full = circuits.faithfulness_curve(model, batches, graph, edge_list, runs=scored.runs)
    assert fast == full


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


def _reference_faithfulness(model, batch, graph, kept):
    """The ablation written out plainly, independently of `EdgeAblator`: a clean pass with
    split q/k/v inputs in which every destination's input moves by `src_corrupt -
    src_current` of each removed upstream source, every source's output recomputed from its
    own activations as the pass reaches it."""
    from workbench.core import Hook, Node

    cfg = model.cfg
    removed = graph.valid.float() * (1 - kept)
    index = {s: i for i, s in enumerate(graph.sources)}

    def outputs(cache, name):
        node = Node.parse(name)
        if node.kind == "input":
            return cache[Hook.resid_pre(0)]
        if node.kind == "mlp":
            return cache[Hook.mlp_out(node.layer)]
        return cache[Hook.z(node.layer)][:, :, node.head] @ model.W_O[node.layer, node.head]

    with torch.no_grad(), edges.graph_hooks_enabled(model, graph):
        _, corrupt = model.run_with_cache(batch.corrupt)
        current = {}

        def save(act, hook):
            current[hook.name] = act

        def move(dst, head):
            t = graph.destinations.index(dst)

            def hook_fn(act, hook):
                shift = sum(
                    outputs(corrupt, s) - outputs(current, s)
                    for s in graph.sources
                    if removed[index[s], t] > 0
                )
                if isinstance(shift, int):
                    return act
                act = act.clone()
                if head is None:
                    act += shift
                else:
                    act[:, :, head] += shift
                return act

            return hook_fn

        hooks = [(Hook.resid_pre(0), save)]
        for layer in range(cfg.n_layers):
            hooks += [(Hook.z(layer), save), (Hook.mlp_out(layer), save)]
        for dst in graph.destinations:
            node = Node.parse(dst)
            hooks.append((node.in_hook(cfg.n_layers), move(dst, node.head)))
        logits = model.run_with_hooks(batch.clean, fwd_hooks=hooks)
        m = float(logit_diff(logits, batch.answer, batch.wrong).mean())
        m_clean = float(logit_diff(model(batch.clean), batch.answer, batch.wrong).mean())
        m_corr = float(logit_diff(model(batch.corrupt), batch.answer, batch.wrong).mean())
    return (m - m_corr) / (m_clean - m_corr)


@pytest.mark.parametrize("share_kept", [0.02, 0.3, 0.7, 0.98])
@pytest.mark.parametrize("kind", ["gpt2", "gpt_neox", "llama"])
def test_ablation_of_random_edge_sets_matches_the_plain_intervention(
    tiny_hf_dirs, kind, share_kept
):
    """Sparse and dense kept sets exercise every way a pass moves a destination: heads that
    keep every input, heads that keep none (the corrupt run's q/k/v), heads that keep some
    (their projection recomputed), and shifts taken as the removed sources or as the total
    less the kept ones; two masks share each forward pass. LayerNorm and RMSNorm, sequential
    and parallel blocks, grouped-query attention (llama)."""
    loaded = load_checkpoint(resolve_checkpoints(str(tiny_hf_dirs[kind]))[0])
    model, batches = loaded.model, make_batches(load_task("induction", loaded, n_prompts=6))
    graph = edges.model_graph(model)
    generator = torch.Generator().manual_seed(int(share_kept * 100))
    masks = [
        (torch.rand(graph.valid.shape, generator=generator) < share_kept).float() for _ in range(3)
    ]
    ablator = circuits.EdgeAblator(model, batches[:1], graph)
    ours = ablator.faithfulness_of_many(masks, max_rows=2 * batches[0].size)
    for mask, value in zip(masks, ours, strict=True):
        reference = _reference_faithfulness(model, batches[0], graph, mask)
        assert value == pytest.approx(reference, abs=1e-4)


def test_a_pass_holds_one_copy_once_a_copys_differences_pass_the_bound(tiny_hf_dirs, monkeypatch):
    """Masks share a forward pass only while their copies' source differences fit in
    `PASS_DIFFERENCES_BYTES`; past it each pass runs one copy (never none), and every mask's
    value is still the plain intervention's."""
    loaded = load_checkpoint(resolve_checkpoints(str(tiny_hf_dirs["gpt2"]))[0])
    model, batches = loaded.model, make_batches(load_task("induction", loaded, n_prompts=6))
    graph = edges.model_graph(model)
    generator = torch.Generator().manual_seed(3)
    masks = [(torch.rand(graph.valid.shape, generator=generator) < 0.5).float() for _ in range(3)]
    copies: list[int] = []
    run = circuits._run_with_removed_edges

    def counted(model, batch, graph, removed, *args):
        copies.append(int(removed.shape[0]))
        return run(model, batch, graph, removed, *args)

    monkeypatch.setattr(circuits, "_run_with_removed_edges", counted)
    ablator = circuits.EdgeAblator(model, batches[:1], graph)
    shared = ablator.faithfulness_of_many(masks, max_rows=2 * batches[0].size)
    assert copies == [2, 1]  # within the bound: two copies in the first pass
    copies.clear()
    monkeypatch.setattr(circuits, "PASS_DIFFERENCES_BYTES", 1)
    alone = ablator.faithfulness_of_many(masks, max_rows=2 * batches[0].size)
    assert copies == [1, 1, 1]
    for mask, a, b in zip(masks, alone, shared, strict=True):
        assert a == pytest.approx(b, abs=1e-6)
        assert a == pytest.approx(_reference_faithfulness(model, batches[0], graph, mask), abs=1e-4)


@pytest.mark.parametrize("normalization", ["LN", "LNPre", "RMS", "RMSPre"])
def test_moved_inputs_are_normalised_in_place_as_the_module_does(normalization):
    """The curve normalises the mixed heads' moved inputs step by step in place; the numbers
    are the block's own normalisation module's, bit for bit, whatever the buffers held."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from workbench.memory import Scratch

    cfg = HookedTransformerConfig(
        n_layers=1, d_model=24, n_ctx=8, d_head=6, n_heads=4, d_vocab=10, act_fn="relu",
        normalization_type=normalization,
    )  # fmt: skip
    torch.manual_seed(0)
    model = HookedTransformer(cfg)
    with torch.no_grad():
        for param in model.blocks[0].ln1.parameters():
            param.normal_(1.0, 0.3)
    moved = torch.randn(5, 3, 7, 24) * 3 + 0.5
    scratch = Scratch()
    scratch.take("squares", (6, 3, 7, 24), torch.float32, moved.device).fill_(float("nan"))
    expected = model.blocks[0].ln1(moved)
    own = moved.clone()
    normed = edges.input_norm_in_place(model, 0, own, scratch)
    assert normed.data_ptr() == own.data_ptr()  # written over the moved inputs
    assert torch.equal(normed, expected)
    # inputs not in the configured dtype (the module rounds to it): the module's own call
    wider = model.double()  # leaves cfg.dtype at float32
    doubled = moved.double()
    expected = wider.blocks[0].ln1(doubled)
    assert torch.equal(edges.input_norm_in_place(wider, 0, doubled.clone(), scratch), expected)
