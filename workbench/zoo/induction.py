"""Training data for the `induction` zoo model.

Each sequence is `<bos>`, a random prefix of 0..`max_offset` words, then a segment of distinct
random words repeated until the context is full. The repeat period is drawn from
`TRAIN_PERIODS` and the offset varies, so predicting the repeats needs content-based induction
([A][B] ... [A] -> [B]): a previous-token head in layer 0 and an induction head in layer 1
(Olsson et al. 2022). `HELD_OUT_PERIODS` are never used in training and serve to test that the
learned mechanism does not depend on the period.
"""

import torch

TRAIN_PERIODS = (4, 5, 6, 7, 9, 10, 11, 13, 14, 15, 17, 18, 19)
HELD_OUT_PERIODS = (8, 12, 16)

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
        period = periods[int(torch.randint(len(periods), (1,), generator=generator))]
        offset = int(torch.randint(max_offset + 1, (1,), generator=generator))
        prefix = word_ids[torch.randint(n_words, (offset,), generator=generator)]
        segment = word_ids[torch.randperm(n_words, generator=generator)[:period]]
        reps = (n_ctx - 1 - offset) // period + 1
        body = torch.cat([prefix, segment.repeat(reps)])[: n_ctx - 1]
        rows.append(torch.cat([torch.tensor([bos_id]), body]))
    return torch.stack(rows)


def predictable_mask(tokens: torch.Tensor) -> torch.Tensor:
    """[batch, pos-1] True where the next token already occurred earlier in the sequence.

    Training on these positions only gives the induction signal without the noise of
    unpredictable random words.
    """
    n = tokens.shape[1]
    seen = tokens[:, 1:, None] == tokens[:, None, :]  # target j+1 vs every earlier token k
    causal = torch.ones(n - 1, n, dtype=torch.bool).tril()
    return (seen & causal).any(-1)
