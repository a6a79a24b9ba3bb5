"""Transcoder training holds the corpus's last windows out, and the stored quality is measured on
them: recomputed here from the saved set and the model's own activations."""

import math

import pytest
import torch

from tests.sae.conftest import query
from workbench.models import load_checkpoint, resolve_checkpoints
from workbench.sae.corpus import Corpus, load_corpus
from workbench.tasks import load_task
from workbench.transcoders import train
from workbench.transcoders.sets import load_transcoder_set
from workbench.transcoders.train import TranscoderTraining, train_transcoders

CORPUS_TOKENS = 12000  # as the graph_store fixture trains its set


@pytest.fixture(scope="module")
def ioi_final(ioi_dir):
    return load_checkpoint(resolve_checkpoints(str(ioi_dir))[-1])


def test_the_stored_quality_is_measured_on_the_held_out_windows(graph_store, ioi_final):
    loaded = ioi_final
    model = loaded.model
    corpus = load_corpus("task", loaded, load_task("ioi", loaded), n_tokens=CORPUS_TOKENS)
    n = len(corpus.windows)
    held = corpus.windows[n - math.ceil(n * 0.1) :]
    (row,) = query(graph_store.db, "SELECT * FROM transcoder_sets")
    tset = load_transcoder_set(row["path"]).fitted_to(model, row["path"])
    layers = query(
        graph_store.db, "SELECT * FROM saes WHERE set_id = ? ORDER BY sae_id", [row["set_id"]]
    )
    names = [f"blocks.{i}.ln2.hook_normalized" for i in range(2)]
    names += [f"blocks.{i}.hook_mlp_out" for i in range(2)]
    with torch.no_grad():
        _, cache = model.run_with_cache(held, names_filter=names)
    counted = held != loaded.bos_token_id
    counted[:, 0] = False  # a window's first position (the attention sink) is not counted
    for layer, stored in enumerate(layers):
        tc = tset.transcoders[layer]
        x = cache[f"blocks.{layer}.ln2.hook_normalized"]
        y = cache[f"blocks.{layer}.hook_mlp_out"]
        with torch.no_grad():
            y_hat = tc.decode(tc.encode(x)) + tc.skip(x)
        y, y_hat = y[counted].double(), y_hat[counted].double()
        explained = 1 - (y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum()
        assert stored["n_tokens"] == int(counted.sum())  # the held-out tokens counted
        assert stored["explained_variance"] == pytest.approx(float(explained), abs=1e-6)
        l0 = float((tc.encode(x)[counted] > 0).sum(-1).double().mean())
        assert stored["l0"] == pytest.approx(l0, abs=1e-9)

    first = slice(0, 64)  # the cross-entropy is measured on the first 64 held-out windows
    assert corpus.loss_mask is not None  # the zoo's own sequences and loss mask
    mask = corpus.loss_mask[n - len(held) :][first]
    expected = _replaced_loss(model, tset, held[first], counted[first], mask)
    assert row["ce_loss_replaced"] == pytest.approx(float(expected), abs=1e-5)


def _replaced_loss(model, tset, windows, counted, mask=None):  # type: ignore[no-untyped-def]
    """The next-token loss with every MLP's output at the `counted` positions replaced by its
    transcoder's, computed here with hooks of its own."""
    inputs: dict[int, torch.Tensor] = {}

    def read(layer):  # type: ignore[no-untyped-def]
        def hook(act, hook):  # type: ignore[no-untyped-def]
            inputs[layer] = act

        return hook

    def write(layer):  # type: ignore[no-untyped-def]
        def hook(act, hook):  # type: ignore[no-untyped-def]
            out = act.clone()
            out[counted] = tset.transcoders[layer](inputs[layer][counted])
            return out

        return hook

    n_layers = len(tset.transcoders)
    hooks = [(f"blocks.{i}.ln2.hook_normalized", read(i)) for i in range(n_layers)]
    hooks += [(f"blocks.{i}.hook_mlp_out", write(i)) for i in range(n_layers)]
    with torch.no_grad():
        logits = model.run_with_hooks(windows, fwd_hooks=hooks)
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), windows[:, 1:], reduction="none"
    )
    return float(loss.mean() if mask is None else loss[mask].mean())


def test_training_never_sees_the_held_out_windows(ioi_final, monkeypatch):
    """The held-out windows hold a token no training window has: no batch trained on has it."""
    loaded = ioi_final
    windows = load_corpus("task", loaded, load_task("ioi", loaded), n_tokens=4096).windows
    vocab = torch.arange(loaded.model.cfg.d_vocab)
    in_windows = (windows[:, :, None] == vocab).any(1).sum(0)  # windows holding each token
    marker = int(in_windows.argmin())  # the rarest token, left out of the training windows
    windows = windows[~(windows == marker).any(1)]
    assert len(windows) > 16
    n_held = 8
    held = torch.full((n_held, windows.shape[1]), marker)
    corpus = Corpus("marked", torch.cat([windows, held]))
    cfg = TranscoderTraining(expansion=1, training_tokens=8 * corpus.n_tokens,
                             held_out=n_held / len(corpus.windows))  # fmt: skip
    assert cfg.training_windows(corpus) == len(windows)
    seen: list[torch.Tensor] = []
    pairs = train._pairs

    def recording(loaded, tset, batch):  # type: ignore[no-untyped-def]
        seen.append(batch)
        return pairs(loaded, tset, batch)

    monkeypatch.setattr(train, "_pairs", recording)
    train_transcoders(loaded, corpus, cfg)
    trained_on = torch.cat(seen)
    assert len(trained_on) >= 8 * len(windows)  # every training window, several times over
    assert not (trained_on == marker).any()


def test_a_corpus_too_small_to_hold_windows_out_is_one_sentence(ioi_final):
    from workbench.errors import BadInput

    one = Corpus("one window", torch.zeros((1, 8), dtype=torch.long))
    with pytest.raises(BadInput, match="too few to hold out"):
        TranscoderTraining().training_windows(one)
    assert TranscoderTraining(held_out=0).training_windows(one) == 1
    with pytest.raises(BadInput, match="--held-out"):
        TranscoderTraining(held_out=1).check()


def test_a_windows_first_position_is_neither_trained_nor_measured(graph_store, ioi_final):
    """Windows cut from running text start mid-sentence, without BOS: their first position (the
    attention sink) is left out of the quality as BOS is, and keeps the MLP's own output in the
    replacement model."""
    loaded = ioi_final
    windows = load_corpus("task", loaded, load_task("ioi", loaded), n_tokens=4096).windows
    shifted = windows.reshape(-1)[3 : 3 + (windows.numel() - 48)].reshape(-1, windows.shape[1])
    assert (shifted[:, 0] != loaded.bos_token_id).all()
    (row,) = query(graph_store.db, "SELECT * FROM transcoder_sets")
    tset = load_transcoder_set(row["path"]).fitted_to(loaded.model, row["path"])
    quality = train.measure(loaded, tset, Corpus("shifted", shifted), ce_windows=len(shifted))
    counted = int(((shifted != loaded.bos_token_id)[:, 1:]).sum())
    assert [q.n_tokens for q in quality.layers] == [counted, counted]

    counted_at = (shifted != loaded.bos_token_id) & (torch.arange(shifted.shape[1]) > 0)
    expected = _replaced_loss(loaded.model, tset, shifted, counted_at)
    assert quality.ce_loss_replaced == pytest.approx(expected, abs=1e-5)
    everywhere = _replaced_loss(loaded.model, tset, shifted, torch.ones_like(counted_at))
    assert abs(everywhere - expected) > 1e-3  # position 0 replaced too: 0.016 apart
