"""The induction zoo model forms a previous-token head and an induction head, and by the end of
training leaves the task to them.

Scores are computed here from attention patterns alone, on repeat periods that training never
used, independently of the attribution code.
"""

import torch

from workbench.models import load_checkpoint, resolve_checkpoints
from workbench.zoo import TrainConfig, train_zoo_model
from workbench.zoo.induction import HELD_OUT_PERIODS, TRAIN_PERIODS, repeated_sequences
from workbench.zoo.vocab import word_ids


def pattern_scores(loaded, period: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(previous-token score per layer-0 head, induction score per layer-1 head)."""
    tok = loaded.tokenizer
    gen = torch.Generator().manual_seed(1234 + period)
    n_ctx = loaded.model.cfg.n_ctx
    tokens = repeated_sequences(
        torch.tensor(word_ids(tok)),
        batch=24,
        n_ctx=n_ctx,
        bos_id=tok.bos_token_id,
        periods=(period,),
        max_offset=0,
        generator=gen,
    )
    _, cache = loaded.model.run_with_cache(tokens)
    q = torch.arange(2, n_ctx)
    prev = cache["pattern", 0][:, :, q, q - 1].mean((0, 2))
    # induction: attention from i to every j whose previous token equals token i
    match = torch.zeros(tokens.shape[0], n_ctx, n_ctx)
    match[:, :, 1:] = (tokens[:, :, None] == tokens[:, None, :-1]).float()
    match = match * torch.ones(n_ctx, n_ctx).tril()
    rows = torch.arange(period + 1, n_ctx)
    induction = (cache["pattern", 1] * match[:, None])[:, :, rows].sum(-1).mean((0, 2))
    return prev, induction


def test_held_out_periods_are_never_trained():
    assert not set(HELD_OUT_PERIODS) & set(TRAIN_PERIODS)


def test_final_checkpoint_has_previous_token_and_induction_heads(induction_dir, measured):
    final = load_checkpoint(resolve_checkpoints(str(induction_dir))[-1])
    for period in HELD_OUT_PERIODS:
        prev, induction = pattern_scores(final, period)
        # uniform attention over ~24 earlier positions would give ~0.04
        assert measured("final_prev_max", prev.max()) > 0.2, (period, prev)
        assert measured("final_induction_max", induction.max()) > 0.5, (period, induction)


def test_final_checkpoint_leaves_the_task_to_few_heads(induction_dir, measured):
    """One previous-token head and one or two induction heads (one for seeds 0 and 2, two for
    seed 1); the other heads' attention is unspecific. Measured over seeds 0-2 and three kernels
    (make spread): the second previous-token score 0.064-0.066, the induction heads 0.77-0.89,
    the strongest other layer-1 head 0.04-0.11."""
    final = load_checkpoint(resolve_checkpoints(str(induction_dir))[-1])
    for period in HELD_OUT_PERIODS:
        prev, induction = pattern_scores(final, period)
        measured("final_second_prev", prev.sort().values[-2])
        measured("final_weakest_induction_head", induction[induction > 0.5].min())
        measured("final_strongest_other_head", induction[induction <= 0.5].max())
        assert int((prev > 0.2).sum()) == 1 and int((prev > 0.12).sum()) == 1, (period, prev)
        assert 1 <= int((induction > 0.5).sum()) <= 2, (period, induction)
        assert int((induction > 0.15).sum()) == int((induction > 0.5).sum()), (period, induction)


def test_early_checkpoint_has_neither(induction_dir, measured):
    """Before the phase change no head is specific: the step-200 scores are a fraction of the
    final heads' (previous-token 0.48-0.55, induction 0.80-0.89 at step 1000). Measured at step
    200 over seeds 0-2 and three kernels: previous-token 0.079-0.094, induction 0.060-0.133
    (uniform causal attention alone gives about 0.1 on period 8)."""
    refs = resolve_checkpoints(str(induction_dir))
    early = load_checkpoint(next(r for r in refs if r.step == 200))
    for period in HELD_OUT_PERIODS:
        prev, induction = pattern_scores(early, period)
        assert measured("step200_prev_max", prev.max()) < 0.12, (period, prev)
        assert measured("step200_induction_max", induction.max()) < 0.2, (period, induction)


def test_checkpoints_span_training(induction_dir):
    steps = [r.step for r in resolve_checkpoints(str(induction_dir))]
    assert steps[0] == 0 and steps[-1] == 1000 and len(steps) == 11


def test_training_is_deterministic_given_seed(tmp_path):
    a = train_zoo_model(TrainConfig(out=str(tmp_path / "a"), steps=5, save_every=5, seed=3))
    b = train_zoo_model(TrainConfig(out=str(tmp_path / "b"), steps=5, save_every=5, seed=3))
    assert (a[-1] / "model.safetensors").read_bytes() == (b[-1] / "model.safetensors").read_bytes()
    c = train_zoo_model(TrainConfig(out=str(tmp_path / "c"), steps=5, save_every=5, seed=4))
    assert (a[-1] / "model.safetensors").read_bytes() != (c[-1] / "model.safetensors").read_bytes()
