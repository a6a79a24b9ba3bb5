"""Training data for the `induction` zoo model.

Each sequence is `<bos>`, a random prefix of 0..`max_offset` words, then a segment of distinct
random words repeated until the context is full. The repeat period is drawn from
`TRAIN_PERIODS` and the offset varies, so predicting the repeats needs content-based induction
([A][B] ... [A] -> [B]): a previous-token head in layer 0 and an induction head in layer 1
(Olsson et al. 2022). `HELD_OUT_PERIODS` are never used in training and serve to test that the
learned mechanism does not depend on the period.

Left to itself the model spreads the job over its heads: every layer-1 head does some induction
and several layer-0 heads carry some of the previous token, so most of its 81 edges are needed
to reproduce the behaviour. Training therefore adds a group-lasso penalty over heads
(`TRAINING`; see `workbench.zoo.train`): after the phase change (around steps 300-400) the heads
compete, and by the end of training a single previous-token head in layer 0 and a single
induction head in layer 1 (two with some seeds) carry the task while the other heads' weights
have decayed to zero, so that their attention is uniform. The penalty also speeds the phase
change up, and a learning rate of 1.5e-3 lets the losers' weights decay within 1000 steps.
"""

import torch

TRAIN_PERIODS = (4, 5, 6, 7, 9, 10, 11, 13, 14, 15, 17, 18, 19)
HELD_OUT_PERIODS = (8, 12, 16)

# learning rate and group-lasso coefficients (OV and QK weights of each head)
TRAINING = {"lr": 1.5e-3, "head_ov_l1": 0.1, "head_qk_l1": 0.01}

MODEL_CONFIG = {
    "n_layers": 2,
    "d_model": 64,
    "n_heads": 4,
    "d_head": 16,
    "n_ctx": 48,
    "attn_only": True,
    "normalization_type": "LN",
    "positional_embedding_type": "standard",
    "act_fn": None,
    "d_mlp": None,
    "default_prepend_bos": True,
}


def repeated_sequences(
    word_ids: torch.Tensor,
    *,
    batch: int,
    n_ctx: int,
    bos_id: int,
    periods: tuple[int, ...],
    max_offset: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """A batch [batch, n_ctx] of `<bos>` + random prefix + a repeated random segment."""
    rows = []
    n_words = word_ids.numel()
    for _ in range(batch):
        period = periods[int(torch.randint(len(periods), (1,), generator=generator, device="cpu"))]
        offset = int(torch.randint(max_offset + 1, (1,), generator=generator, device="cpu"))
        prefix = word_ids[torch.randint(n_words, (offset,), generator=generator, device="cpu")]
        segment = word_ids[torch.randperm(n_words, generator=generator, device="cpu")[:period]]
        reps = (n_ctx - 1 - offset) // period + 1
        body = torch.cat([prefix, segment.repeat(reps)])[: n_ctx - 1]
        rows.append(torch.cat([torch.tensor([bos_id], device=body.device), body]))
    return torch.stack(rows)


def predictable_mask(tokens: torch.Tensor) -> torch.Tensor:
    """[batch, pos-1] True where the next token already occurred earlier in the sequence.

    Training on these positions only gives the induction signal without the noise of
    unpredictable random words.
    """
    n = tokens.shape[1]
    seen = tokens[:, 1:, None] == tokens[:, None, :]  # target j+1 vs every earlier token k
    causal = torch.ones(n - 1, n, dtype=torch.bool, device=tokens.device).tril()
    return (seen & causal).any(-1)
