"""The `ioi` zoo model learns indirect object identification, and a head moves a name to the
logits: its direct logit attribution leads, and from the last position it attends to the names
of the sentence. Which layer that head is in depends on the training run (layer 1 for zoo seeds
0 and 2, layer 0 for seed 1), and so does which name it reads (seed 0's head attends to the
subject and writes against it, pushing logit(IO) - logit(S) up all the same).
"""

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


def test_final_checkpoint_solves_ioi_and_the_first_does_not(ioi_dir, measured):
    refs = resolve_checkpoints(str(ioi_dir))
    assert measured("final_accuracy", _accuracy(load_checkpoint(refs[-1]))) >= 0.95
    assert measured("first_accuracy", _accuracy(load_checkpoint(refs[0]))) <= 0.3


def test_ioi_prompts_read_as_text_and_corrupt_has_other_names(ioi_dir):
    loaded = load_checkpoint(resolve_checkpoints(str(ioi_dir))[-1])
    pair = load_task("ioi", loaded).pairs[0]
    assert pair.clean_text is not None and pair.clean_text.endswith(" to")
    clean_names = set(pair.clean_text.split()[1:4:2])
    corrupt_names = set(pair.corrupt_text.split()[1:4:2])
    assert not clean_names & corrupt_names
    vocab = loaded.tokenizer.get_vocab()
    assert {pair.answer, pair.wrong} <= {vocab[n] for n in clean_names}


def test_heads_move_the_names(ioi_dir, measured):
    """The heads' direct effects on the logits push the indirect object over the subject, and
    the head whose direct effect leads reads a name: from the last position it attends to the
    names of the sentence. (One head carries it for zoo seeds 0 and 2, DLA 1.36-1.37; several
    share it for seed 1, the largest 0.26.)"""
    loaded = load_checkpoint(resolve_checkpoints(str(ioi_dir))[-1])
    batches = make_batches(load_task("ioi", loaded))
    dla = direct_logit_attribution(loaded.model, batches)
    layer, head = divmod(int(dla.scores.argmax()), loaded.model.cfg.n_heads)
    on_names = total = 0.0
    for batch in batches:
        _, cache = loaded.model.run_with_cache(batch.clean)
        last = cache["pattern", layer][:, head, -1]  # [batch, key position]
        names = (batch.clean == batch.answer[:, None]) | (batch.clean == batch.wrong[:, None])
        on_names += float((last * names).sum())
        total += float(last.sum())
    share = measured("attention_on_names", on_names / total)
    heads_total = measured("heads_dla", float(dla.scores.sum()))
    # measured over seeds 0-2 and the avx512, avx2 and default kernels (make spread): the
    # heads' summed DLA 0.90-2.38, the leading head's attention on the names 0.83-0.86
    assert heads_total > 0.5
    assert share > 0.5
