"""The `ioi` zoo model learns indirect object identification, and a layer-1 head moves the
indirect object's name to the logits (its direct logit attribution leads)."""

import torch

from workbench.attribution.batches import make_batches
from workbench.attribution.heads import direct_logit_attribution
from workbench.models import load_checkpoint, resolve_checkpoints
from workbench.tasks import load_task


def _accuracy(loaded) -> float:
    task = load_task("ioi", loaded, n_prompts=64)
    (batch,) = make_batches(task)
    with torch.no_grad():
        predicted = loaded.model(batch.clean)[:, -1].argmax(-1)
    return float((predicted == batch.answer).float().mean())


def test_final_checkpoint_solves_ioi_and_the_first_does_not(ioi_dir):
    refs = resolve_checkpoints(str(ioi_dir))
    assert _accuracy(load_checkpoint(refs[-1])) >= 0.95
    assert _accuracy(load_checkpoint(refs[0])) <= 0.3


def test_ioi_prompts_read_as_text_and_corrupt_has_other_names(ioi_dir):
    loaded = load_checkpoint(resolve_checkpoints(str(ioi_dir))[-1])
    pair = load_task("ioi", loaded).pairs[0]
    assert pair.clean_text is not None and pair.clean_text.endswith(" to")
    clean_names = set(pair.clean_text.split()[1:4:2])
    corrupt_names = set(pair.corrupt_text.split()[1:4:2])
    assert not clean_names & corrupt_names
    vocab = loaded.tokenizer.get_vocab()
    assert {pair.answer, pair.wrong} <= {vocab[n] for n in clean_names}


def test_a_layer_one_head_moves_the_name(ioi_dir):
    loaded = load_checkpoint(resolve_checkpoints(str(ioi_dir))[-1])
    dla = direct_logit_attribution(loaded.model, make_batches(load_task("ioi", loaded)))
    layer, _head = divmod(int(dla.scores.argmax()), loaded.model.cfg.n_heads)
    assert layer == 1 and float(dla.scores.max()) > 0.5
