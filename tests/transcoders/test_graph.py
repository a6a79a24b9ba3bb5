"""The attribution graph's edges against interventions: each edge is the change of its target's
readout when its source is removed from the frozen replacement model, and each readout is the
sum of its incoming edges plus the readout with every node removed. Identities of a linear
model: asserted to 1e-9 in float64 and 1e-5 (relative to the readout's scale) in float32.

The frozen model here is written independently of `workbench.transcoders.graph`: a run of the
real model whose attention patterns and normalisation scales are overwritten by their cached
clean values and whose MLP outputs are the clean ones, less the skip term at the clean input,
plus the skip term at the current input (and any perturbation)."""

import numpy as np
import pytest
import torch

from workbench.models import load_checkpoint, resolve_checkpoints
from workbench.transcoders import pruning
from workbench.transcoders.graph import attribute, graph_scores, prune
from workbench.transcoders.sets import Transcoder, TranscoderSet


def random_set(model, *, d_tc=48, skip=True, activation="relu", seed=0) -> TranscoderSet:
    g = torch.Generator().manual_seed(seed)
    d = model.cfg.d_model
    dtype = model.W_U.dtype

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    tcs = []
    for _ in range(model.cfg.n_layers):
        tcs.append(
            Transcoder(
                W_enc=rand(d, d_tc, scale=d**-0.5),
                b_enc=rand(d_tc, scale=0.3) - 0.4,
                W_dec=rand(d_tc, d, scale=d**-0.5),
                b_dec=rand(d, scale=0.1),
                W_skip=rand(d, d, scale=0.2 * d**-0.5) if skip else None,
                threshold=(rand(d_tc).abs() * 0.1) if activation == "jumprelu" else None,
                activation=activation,
            )
        )
    hook_in = "ln2.hook_normalized" if model.cfg.normalization_type else "hook_resid_mid"
    return TranscoderSet(tcs, hook_in=hook_in)


class Frozen:
    """The replacement model of one prompt, by overwriting activations with cached ones."""

    def __init__(self, model, tokens, tset):
        self.model, self.tokens, self.tset = model, tokens[None], tset
        frozen = [
            n for n in model.hook_dict if n.endswith("hook_pattern") or n.endswith("hook_scale")
        ]
        names = frozen + [tset.input_hook(i) for i in range(model.cfg.n_layers)]
        names += [tset.output_hook(i) for i in range(model.cfg.n_layers)]
        with torch.no_grad():
            _, self.cache = model.run_with_cache(self.tokens, names_filter=names)
        self.frozen = frozen

    def readouts(self, delta_embed, delta_out, features, logit_tokens):
        """(feature pre-activations less b_enc, logits less their mean and their own bias
        term) with the node vectors perturbed by the deltas."""
        model, tset, cache = self.model, self.tset, self.cache
        seen = {}

        def put(name):
            return lambda act, hook: cache[name]

        def add_embed(act, hook):
            return act + delta_embed[None]

        def keep(layer):
            def fn(act, hook):
                seen[layer] = act
                return act

            return fn

        def mlp(layer):
            def fn(act, hook):
                tc = tset[layer]
                clean = cache[tset.output_hook(layer)]
                base = clean - tc.skip(cache[tset.input_hook(layer)])
                return tc.skip(seen[layer]) + base + delta_out[layer][None]

            return fn

        hooks = [(n, put(n)) for n in self.frozen] + [("hook_embed", add_embed)]
        for layer in range(model.cfg.n_layers):
            hooks += [(tset.input_hook(layer), keep(layer)), (tset.output_hook(layer), mlp(layer))]
        with torch.no_grad():
            logits = model.run_with_hooks(self.tokens, fwd_hooks=hooks)[0, -1]
            b_U = model.b_U
            demeaned = logits - logits.mean() - (b_U - b_U.mean())
            feats = [seen[layer][0, pos] @ tset[layer].W_enc[:, f] for layer, pos, f in features]
            return torch.stack([*feats, *demeaned[logit_tokens]])


def load_model(path, dtype):
    model = load_checkpoint(resolve_checkpoints(str(path))[-1]).model
    return model.to(dtype)


def node_vectors(graph, model, tset, frozen):
    """The vector each node writes: (where, position, vector) with where "embed" or a layer."""
    cache = frozen.cache
    out = []
    for i in graph.selected.tolist():
        layer, pos, f = graph.active[i].tolist()
        out.append((layer, pos, float(graph.activations[i]) * tset[layer].W_dec[f]))
    for layer in range(graph.n_layers):
        tc = tset[layer]
        x = cache[tset.input_hook(layer)][0]
        acts = tc.encode(x)
        if graph.params["zero_first_position"]:
            acts[0] = 0
        error = cache[tset.output_hook(layer)][0] - tc.decode(acts) - tc.skip(x)
        for pos in range(graph.n_pos):
            keep = not (graph.params["zero_first_position"] and pos == 0)
            out.append((layer, pos, error[pos] if keep else torch.zeros_like(error[pos])))
    W_E = model.W_E
    for pos, token in enumerate(graph.tokens):
        out.append(("embed", pos, W_E[token]))
    return out


def removed(model, graph, items):
    """Deltas that remove the given (where, position, vector) items."""
    dtype, d = model.W_U.dtype, model.cfg.d_model
    embed = torch.zeros(graph.n_pos, d, dtype=dtype)
    out = [torch.zeros(graph.n_pos, d, dtype=dtype) for _ in range(graph.n_layers)]
    for where, pos, vec in items:
        (embed if where == "embed" else out[where])[pos] -= vec
    return embed, out


CASES = [("LN", True, "relu"), ("RMSPre", True, "jumprelu"), (None, False, "relu")]


@pytest.mark.parametrize(("norm", "skip", "activation"), CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_each_edge_is_the_effect_of_removing_its_source(norm_dirs, norm, skip, activation, dtype):
    model = load_model(norm_dirs[norm], dtype)
    tset = random_set(model, skip=skip, activation=activation)
    tokens = torch.tensor([0, 5, 17, 3, 44, 9, 23])
    graph = attribute(model, tokens, tset, zero_first_position=True, max_n_logits=4,
                      desired_logit_prob=0.99, batch_size=8)  # fmt: skip
    frozen = Frozen(model, tokens, tset)
    features = [tuple(graph.active[i].tolist()) for i in graph.selected.tolist()]
    assert features, "the random transcoders should have active features"
    assert all(pos > 0 for _, pos, _ in features), "no feature at the BOS position"
    vectors = node_vectors(graph, model, tset, frozen)
    no_change = removed(model, graph, [])
    base = frozen.readouts(*no_change, features, graph.logit_tokens)
    n_targets = len(base)
    target_rows = list(range(graph.n_features)) + [
        graph.logit_index(i) for i in range(len(graph.logit_tokens))
    ]
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    scale = float(base.abs().max())
    # every source, one at a time
    for s, item in enumerate(vectors):
        change = frozen.readouts(*removed(model, graph, [item]), features, graph.logit_tokens)
        expected = -graph.adjacency[target_rows, s].to(dtype)
        assert torch.allclose(change - base, expected, atol=tol * scale, rtol=0), (s, item[:2])
    # the readouts are the edges' sums plus the readout with every node removed
    empty = frozen.readouts(*removed(model, graph, vectors), features, graph.logit_tokens)
    sums = graph.adjacency[target_rows].sum(dim=1).to(dtype)
    assert torch.allclose(base, sums + empty, atol=tol * scale, rtol=0)
    # and the frozen model at rest is the model: the clean pre-activations and logits
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens[None])
    for row, (layer, pos, f) in enumerate(features):
        clean = cache[tset.input_hook(layer)][0, pos] @ tset[layer].W_enc[:, f]
        assert abs(float(clean - base[row])) <= tol * scale
    assert n_targets == graph.n_features + len(graph.logit_tokens)


def test_the_logit_nodes_are_the_most_probable_tokens_up_to_the_probability(norm_dirs):
    model = load_model(norm_dirs["LN"], torch.float64)
    tset = random_set(model)
    tokens = torch.tensor([0, 5, 17, 3])
    with torch.no_grad():
        probs = torch.softmax(model(tokens[None])[0, -1], -1)
    order = torch.argsort(probs, descending=True)
    for desired, cap in ((0.3, 10), (0.9, 10), (0.9, 3)):
        graph = attribute(model, tokens, tset, zero_first_position=True, max_n_logits=cap,
                          desired_logit_prob=desired)  # fmt: skip
        n = len(graph.logit_tokens)
        assert graph.logit_tokens == order[:n].tolist()
        reached = float(probs[order[:n]].sum())
        assert n == cap or reached >= desired
        assert n == 1 or float(probs[order[: n - 1]].sum()) < desired


def test_a_feature_cap_keeps_the_most_influential_features_with_the_same_edges(norm_dirs):
    model = load_model(norm_dirs["LN"], torch.float64)
    tset = random_set(model, d_tc=64)
    tokens = torch.tensor([0, 5, 17, 3, 44, 9, 23, 11])
    full = attribute(model, tokens, tset, zero_first_position=True, batch_size=8)
    capped = attribute(model, tokens, tset, zero_first_position=True, batch_size=4,
                       max_feature_nodes=10, update_interval=1)  # fmt: skip
    assert capped.n_features == 10 < full.n_features
    # the capped graph's edges are the full graph's, restricted to its nodes
    index = {int(a): i for i, a in enumerate(full.selected)}
    keep = [index[int(a)] for a in capped.selected]
    off_full, off_cap = full.offsets(), capped.offsets()
    rest_full = list(range(off_full["error"], full.n_nodes))
    rows = keep + rest_full
    cols = keep + rest_full
    sub = full.adjacency[rows][:, cols]
    assert torch.allclose(capped.adjacency, sub, atol=1e-12)
    assert off_cap["logit"] - off_cap["error"] == off_full["logit"] - off_full["error"]


def test_pruning_keeps_tokens_and_logits_and_scores_lie_in_the_unit_interval(norm_dirs):
    model = load_model(norm_dirs["LN"], torch.float64)
    tset = random_set(model)
    tokens = torch.tensor([0, 5, 17, 3, 44, 9])
    graph = attribute(model, tokens, tset, zero_first_position=True)
    pruned = prune(graph, node_threshold=0.5, edge_threshold=0.9)
    off = graph.offsets()
    assert pruned.node_mask[off["token"] :].all()
    kept_edges = np.argwhere(pruned.edge_mask)
    assert pruned.node_mask[kept_edges[:, 0]].all() and pruned.node_mask[kept_edges[:, 1]].all()
    assert (graph.adjacency.numpy()[pruned.edge_mask] != 0).all()
    everything = prune(graph, node_threshold=1.0, edge_threshold=1.0)
    assert everything.node_mask.sum() >= pruned.node_mask.sum()
    replacement, completeness = graph_scores(graph)
    assert 0 <= replacement <= 1 and 0 <= completeness <= 1


@pytest.mark.parametrize("norm", ["LN", "RMSPre"])
def test_interventions_with_the_transcoders_spliced_in(norm_dirs, norm):
    """Spliced in with the prompt's error terms, the transcoders give the model's own logits;
    setting a feature of the last layer moves the logits exactly as adding its decoder change to
    the last residual stream does."""
    from workbench.transcoders.graph import Intervention, spliced_logits

    model = load_model(norm_dirs[norm], torch.float64)
    tset = random_set(model)
    tokens = torch.tensor([0, 5, 17, 3, 44, 9])
    with torch.no_grad():
        clean, cache = model.run_with_cache(tokens[None])
    assert torch.allclose(spliced_logits(model, tokens, tset), clean[0], atol=1e-10)
    last = model.cfg.n_layers - 1
    acts = tset[last].encode(cache[tset.input_hook(last)][0])
    active = (acts[1:] > 0).nonzero()
    pos, feature = int(active[0, 0]) + 1, int(active[0, 1])
    for value in (0.0, 2.5 * float(acts[pos, feature])):
        moved = spliced_logits(model, tokens, tset, [Intervention(last, pos, feature, value)])
        delta = (value - float(acts[pos, feature])) * tset[last].W_dec[feature]

        def add(act, hook, delta=delta):
            act[0, pos] += delta
            return act

        with torch.no_grad():
            expected = model.run_with_hooks(
                tokens[None], fwd_hooks=[(f"blocks.{last}.hook_resid_post", add)]
            )[0]
        assert torch.allclose(moved, expected, atol=1e-10)
        assert not torch.allclose(moved, clean[0], atol=1e-6)


def test_influence_pruning_and_scores_on_a_graph_worked_by_hand():
    """Features f0, f1, an error e0, a token t0 and a logit l0 (probability 1): l0 <- f0 (3),
    l0 <- e0 (1), f0 <- f1 (2), f0 <- t0 (-2), f1 <- t0 (1), e0 <- t0 (1). By hand: influence
    f0 3/4, f1 3/8, e0 1/4, t0 1; replacement 1 / (1 + 1/4); completeness 3.125 / 3.375. At
    node threshold 0.5 the nodes kept are t0 (share 1/2.375) and f0 (1.75/2.375), with l0; f1
    and e0 go, and the edges left are l0 <- f0 and f0 <- t0."""
    f0, f1, e0, t0, l0 = range(5)
    a = np.zeros((5, 5))
    a[l0, f0], a[l0, e0], a[f0, f1], a[f0, t0], a[f1, t0], a[e0, t0] = 3, 1, 2, -2, 1, 1
    w = np.array([0, 0, 0, 0, 1.0])
    off = pruning.Offsets.of_kinds(["feature", "feature", "error", "token", "logit"])
    assert off == pruning.Offsets(error=2, token=3, logit=4)
    assert pruning.influence(pruning.normalise(a), w).tolist() == [0.75, 0.375, 0.25, 1.0, 0.0]
    replacement, completeness = pruning.scores(a, w, off)
    assert replacement == pytest.approx(0.8, abs=1e-15)
    assert completeness == pytest.approx(3.125 / 3.375, abs=1e-15)
    kept = pruning.prune(a, w, off, node_threshold=0.5, edge_threshold=0.9)
    assert kept.node_mask.tolist() == [True, False, False, True, True]
    assert np.argwhere(kept.edge_mask).tolist() == [[f0, t0], [l0, f0]]
    total = 2.375
    expected = [1.75 / total, 2.125 / total, 1.0, 1 / total, 0.0]
    assert kept.cumulative.tolist() == pytest.approx(expected, abs=1e-15)
    everything = pruning.prune(a, w, off, node_threshold=1.0, edge_threshold=1.0)
    assert everything.node_mask.all() and (everything.edge_mask == (a != 0)).all()
