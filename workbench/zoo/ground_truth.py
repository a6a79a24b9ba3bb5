"""The known circuit of an induction zoo checkpoint, found from attention patterns alone.

Previous-token heads are the layer-0 heads that attend from each position to the one before
(score above `PREV_THRESHOLD` on repeated sequences of a period the model never trained on);
induction heads are the layer-1 heads that attend to the token after an earlier occurrence of
the current token (score above `INDUCTION_THRESHOLD`). The known edges: `input` into every
previous-token head's query, key and value; each previous-token head into each induction head's
key; `input` into each induction head's query and value; each induction head into `logits`.
"""

import torch

from workbench.core import QKV, Hook, Node
from workbench.models.base import LoadedModel
from workbench.zoo.induction import HELD_OUT_PERIODS, repeated_sequences
from workbench.zoo.vocab import word_ids

PREV_THRESHOLD = 0.15
INDUCTION_THRESHOLD = 0.3


@torch.no_grad()
def pattern_scores(
    loaded: LoadedModel, period: int = HELD_OUT_PERIODS[0]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(previous-token score of each layer-0 head, induction score of each layer-1 head)."""
    tok = loaded.tokenizer
    assert tok is not None, "the induction ground truth needs the zoo tokenizer"
    n_ctx = loaded.model.cfg.n_ctx
    generator = torch.Generator().manual_seed(period)
    tokens = repeated_sequences(
        torch.tensor(word_ids(tok)), batch=16, n_ctx=n_ctx, bos_id=tok.bos_token_id,
        periods=(period,), max_offset=0, generator=generator,
    )  # fmt: skip
    _, cache = loaded.model.run_with_cache(tokens)
    q = torch.arange(2, n_ctx)
    prev = cache[Hook.pattern(0)][:, :, q, q - 1].mean((0, 2))
    follows = torch.zeros(tokens.shape[0], n_ctx, n_ctx)
    follows[:, :, 1:] = (tokens[:, :, None] == tokens[:, None, :-1]).float()
    follows = follows * torch.ones(n_ctx, n_ctx).tril()
    rows = torch.arange(period + 1, n_ctx)
    induction = (cache[Hook.pattern(1)] * follows[:, None])[:, :, rows].sum(-1).mean((0, 2))
    return prev, induction


def known_induction_edges(loaded: LoadedModel) -> set[tuple[str, str]]:
    prev, induction = pattern_scores(loaded)
    prev_heads = [h for h in range(len(prev)) if prev[h] > PREV_THRESHOLD]
    induction_heads = [h for h in range(len(induction)) if induction[h] > INDUCTION_THRESHOLD]
    start, end = Node.input().id, Node.logits().id

    def head(layer: int, h: int, port: str | None = None) -> str:
        return Node.head_of(layer, h, port).id

    edges = {(start, head(0, p, port)) for p in prev_heads for port in QKV}
    edges |= {(head(0, p), head(1, i, "k")) for p in prev_heads for i in induction_heads}
    edges |= {(start, head(1, i, port)) for i in induction_heads for port in "qv"}
    edges |= {(head(1, i), end) for i in induction_heads}
    return edges


def roc_auc(edges: list[tuple[str, str, float]], positives: set[tuple[str, str]]) -> float | None:
    """Area under the ROC curve of |score| separating `positives` from the other edges (the
    Mann-Whitney statistic, ties counted half); None if either class is empty."""
    pos = [abs(s) for a, b, s in edges if (a, b) in positives]
    neg = [abs(s) for a, b, s in edges if (a, b) not in positives]
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))
