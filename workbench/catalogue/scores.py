"""What each attention head of a checkpoint does, with no task: scores from its attention
patterns on generated sequences and from its weights alone.

From attention patterns on sequences of random tokens repeated once (`repeated_tokens`), as
TransformerLens's head detector (`transformer_lens.head_detector`, error measure `"mul"`, no
exclusions) defines them: the attention a head puts where a detection pattern is 1, as a share of
all its attention, per sequence, averaged over sequences:

* `previous_token`: from each position to the one before;
* `duplicate_token`: to earlier occurrences of the current token;
* `induction`: to the token after an earlier occurrence of the current token;
* `sink`: the attention every position after the first puts on the first ("Why do LLMs attend
  to the first token?"), averaged over positions and sequences;
* `dormant_novel` and `dormant_repeated`: the share of positions at which the head is dormant,
  putting at least `DORMANT_SINK` (0.9) of its attention on the first position ("Active-Dormant
  Attention Heads"), among the positions of the first half of each sequence (nothing seen yet
  to copy) and of the repeated half. A head dormant on one half and active on the other
  switches with its input: an induction head rests on the first token until there is
  something to copy.

From needle-in-a-haystack prompts (`needle_prompts`), as "Retrieval Head Mechanistically
Explains Long-Context Factuality" (Wu et al. 2024) scores heads:

* `retrieval`: while the model continues a needle whose first tokens end the prompt, greedily,
  the share of the needle's remaining tokens a head copy-pastes: its strongest attention, from
  the position that predicts the token, is on a needle position holding the token the model
  then outputs. Averaged over prompts (Wu et al. keep only prompts the model answers; here
  every prompt counts, so a model that cannot retrieve scores low everywhere).

From the weights (TransformerLens's conventions: normalisations folded or ignored):

* `copying_scores`: the share of positive eigenvalues of each head's full OV circuit
  `W_E W_V W_O W_U` (Elhage et al. 2021, "A Mathematical Framework for Transformer
  Circuits"): `sum(eigenvalues) / sum(|eigenvalues|)`, 1 for a head that copies the tokens it
  attends to, -1 for one that suppresses them;
* `composition_scores`: Q-, K- and V-composition between a head of one layer and a head of a
  later layer, `|A B|_F / (|A|_F |B|_F)` for the earlier head's OV circuit `A` and the later
  head's QK circuit (Q), its transpose (K) or its OV circuit (V), as
  `HookedTransformer.all_composition_scores` computes it.

Heads are TransformerLens's query heads: on a grouped-query model a key/value head's weights
count once for each query head that reads them.
"""

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

from workbench.attribution.batches import model_device
from workbench.core import Hook

PATTERN_SCORES = (
    "previous_token",
    "duplicate_token",
    "induction",
    "sink",
    "dormant_novel",
    "dormant_repeated",
)
DORMANT_SINK = 0.9  # a head is dormant where at least this share of its attention is on token 0
COMPOSITIONS = ("Q", "K", "V")


def repeated_tokens(
    vocab: Iterable[int] | int,
    *,
    n_sequences: int,
    half: int,
    bos: int | None,
    seed: int = 0,
) -> Int[torch.Tensor, "sequence pos"]:
    """`n_sequences` sequences of `half` tokens drawn at random from `vocab` (a list of token
    ids, or a vocabulary size), each followed by itself once more, after `bos` when given."""
    ids = torch.arange(vocab) if isinstance(vocab, int) else torch.tensor(list(vocab))
    generator = torch.Generator().manual_seed(seed)
    draws = ids[torch.randint(len(ids), (n_sequences, half), generator=generator)]
    tokens = torch.cat([draws, draws], dim=1)
    if bos is not None:
        tokens = torch.cat([torch.full((n_sequences, 1), bos, dtype=tokens.dtype), tokens], 1)
    return tokens


def detection_patterns(
    tokens: Int[torch.Tensor, "sequence pos"],
) -> dict[str, Float[torch.Tensor, "sequence pos pos"]]:
    """Per sequence, the 0/1 [query, key] pattern each detected head type attends by."""
    n, pos = tokens.shape
    previous = torch.zeros(pos, pos)
    previous[1:, :-1] = torch.eye(pos - 1)
    earlier = torch.ones(pos, pos).tril(-1)
    duplicate = (tokens[:, :, None] == tokens[:, None, :]).float() * earlier
    induction = torch.zeros(n, pos, pos)
    induction[:, :, 1:] = duplicate[:, :, :-1]  # the key after an earlier occurrence
    induction = induction * torch.ones(pos, pos).tril()
    return {
        "previous_token": previous.expand(n, pos, pos),
        "duplicate_token": duplicate,
        "induction": induction,
    }


@torch.no_grad()
def pattern_scores(
    model: HookedTransformer, tokens: Int[torch.Tensor, "sequence pos"]
) -> dict[str, Float[torch.Tensor, "layer head"]]:
    """Each head's `PATTERN_SCORES` on `tokens` (sequences repeated once, as `repeated_tokens`
    makes them), from one forward pass (the model's device)."""
    cfg = model.cfg
    repeat_from = (tokens.shape[1] + 1) // 2  # the first position of the repeated half
    device = model_device(model)
    patterns = {name: p.to(device) for name, p in detection_patterns(tokens).items()}
    scores = {name: torch.zeros(cfg.n_layers, cfg.n_heads) for name in PATTERN_SCORES}

    def score(pattern: torch.Tensor, hook: object) -> None:
        layer = int(hook.name.split(".")[1])  # type: ignore[attr-defined]
        attention = pattern.float()  # [sequence, head, query, key]
        total = attention.sum((-2, -1))  # [sequence, head]
        for name, detect in patterns.items():
            matched = (attention * detect[:, None]).sum((-2, -1))
            scores[name][layer] = (matched / total).mean(0).cpu()
        scores["sink"][layer] = attention[:, :, 1:, 0].mean((0, 2)).cpu()
        novel, repeated = dormant_shares(attention[:, :, :, 0], repeat_from)
        scores["dormant_novel"][layer] = novel.cpu()
        scores["dormant_repeated"][layer] = repeated.cpu()

    hooks = [(Hook.pattern(layer), score) for layer in range(cfg.n_layers)]
    model.run_with_hooks(tokens.to(device), fwd_hooks=hooks, stop_at_layer=cfg.n_layers)
    return scores


def dormant_shares(
    first: Float[torch.Tensor, "sequence head query"], repeat_from: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head, the share of query positions 1 .. repeat_from-1 (novel) and repeat_from ..
    (repeated) whose attention on position 0 (`first`, indexed by query position) is at least
    `DORMANT_SINK`."""
    dormant = (first >= DORMANT_SINK).float()
    return dormant[:, :, 1:repeat_from].mean((0, 2)), dormant[:, :, repeat_from:].mean((0, 2))


@dataclass(frozen=True)
class NeedlePrompts:
    """Needle-in-a-haystack prompts: each is haystack tokens with a needle of distinct tokens
    at a random depth, then the needle's first `cue` tokens; the model should continue with the
    rest of the needle (`answers`)."""

    tokens: Int[torch.Tensor, "prompt pos"]
    needle_start: Int[torch.Tensor, " prompt"]  # where each needle begins
    answers: Int[torch.Tensor, "prompt answer"]  # the needle's tokens after the cue
    cue: int  # the needle's tokens that end the prompt

    @property
    def needle(self) -> int:
        return self.answers.shape[1] + self.cue


def needle_prompts(
    vocab: Iterable[int] | int,
    *,
    n_prompts: int,
    context: int,
    needle: int,
    cue: int,
    bos: int | None,
    seed: int = 0,
) -> NeedlePrompts:
    """`n_prompts` prompts that, with the `needle - cue` tokens the model is to write, fill
    `context` tokens: `bos` (when given), haystack, the needle at a depth drawn uniformly, more
    haystack, the needle's first `cue` tokens. The needle's tokens are distinct and the
    haystack's are drawn from the rest of `vocab`, so its continuation is unambiguous."""
    ids = torch.arange(vocab) if isinstance(vocab, int) else torch.tensor(list(vocab))
    generator = torch.Generator().manual_seed(seed)
    hay = context - (bos is not None) - 2 * needle  # the needle, and its cue and answer again
    rows, starts = [], []
    for _ in range(n_prompts):
        order = ids[torch.randperm(len(ids), generator=generator)]
        needle_tokens, rest = order[:needle], order[needle:]
        haystack = rest[torch.randint(len(rest), (hay,), generator=generator)]
        depth = int(torch.randint(hay + 1, (1,), generator=generator))
        head = [torch.tensor([bos])] if bos is not None else []
        parts = [*head, haystack[:depth], needle_tokens, haystack[depth:], needle_tokens[:cue]]
        rows.append(torch.cat(parts))
        starts.append(len(head) + depth)
    tokens = torch.stack(rows)
    start = torch.tensor(starts)
    answers = torch.stack([row[s + cue : s + needle] for row, s in zip(rows, starts, strict=True)])
    return NeedlePrompts(tokens, start, answers, cue)


@torch.no_grad()
def retrieval_scores(model: HookedTransformer, prompts: NeedlePrompts) -> torch.Tensor:
    """Each head's retrieval score (`[layer, head]`) on `prompts`, decoding greedily: one
    forward pass per token of the answer, every prompt at once."""
    cfg = model.cfg
    device = model_device(model)
    tokens = prompts.tokens.to(device)
    n, steps = prompts.answers.shape
    positions = torch.arange(tokens.shape[1] + steps, device=device)
    start = prompts.needle_start.to(device)[:, None]
    in_needle = (positions >= start) & (positions < start + prompts.needle)  # [prompt, pos]
    hits = torch.zeros(cfg.n_layers, cfg.n_heads, device=device)
    patterns: dict[int, torch.Tensor] = {}  # per layer, each head's attended key (this step)

    def keep(pattern: torch.Tensor, hook: object) -> None:
        layer = int(hook.name.split(".")[1])  # type: ignore[attr-defined]
        patterns[layer] = pattern[:, :, -1].argmax(-1)  # [prompt, head]

    hooks = [(Hook.pattern(layer), keep) for layer in range(cfg.n_layers)]
    # the prompt once, then each written token alone against the cached keys and values
    # (TransformerLens's cache does not take grouped-query attention run per query head: there
    # the whole sequence is run again at each step)
    ungrouped = cfg.n_key_value_heads is not None and cfg.ungroup_grouped_query_attention
    cache = None if ungrouped else TransformerLensKeyValueCache.init_cache(cfg, device, n)
    step_input = tokens
    for _ in range(steps):
        # the residual stream, then the logits of the last position only
        resid = model.run_with_hooks(
            step_input,
            fwd_hooks=hooks,
            stop_at_layer=cfg.n_layers,
            past_kv_cache=cache,
            attention_mask=torch.ones_like(step_input),  # no padding
        )
        written = model.unembed(model.ln_final(resid[:, -1:]))[:, 0].argmax(-1)  # [prompt]
        width = tokens.shape[1]
        for layer, attended in patterns.items():
            on_needle = in_needle[:, :width].gather(1, attended)
            copied = tokens.gather(1, attended) == written[:, None]
            hits[layer] += (on_needle & copied).float().sum(0)
        tokens = torch.cat([tokens, written[:, None]], dim=1)
        step_input = tokens if cache is None else written[:, None]
    return (hits / (n * steps)).cpu()


@torch.no_grad()
def copying_scores(model: HookedTransformer) -> Float[torch.Tensor, "layer head"]:
    """Each head's share of positive eigenvalues of `W_E W_V W_O W_U`. Its non-zero
    eigenvalues are those of the `d_head x d_head` matrix `W_O (W_U W_E) W_V`."""
    circuit = model.W_U.float() @ model.W_E.float()  # W_U W_E: d_model x d_model
    out = torch.zeros(model.cfg.n_layers, model.cfg.n_heads)
    for layer, block in enumerate(model.blocks):
        w_v, w_o = block.attn.W_V.float(), block.attn.W_O.float()  # [head, d, e], [head, e, d]
        eigenvalues = torch.linalg.eigvals(w_o @ circuit @ w_v)  # [head, e]
        out[layer] = (eigenvalues.sum(-1).real / eigenvalues.abs().sum(-1)).cpu()
    return out


@torch.no_grad()
def composition_scores(
    model: HookedTransformer, mode: str
) -> Float[torch.Tensor, "layer head later_layer later_head"]:
    """Q-, K- or V-composition (`mode`) of every head into every head of a later layer (0
    where the second head is not later).

    The earlier head's OV circuit is `A = W_V W_O` and the later head's circuit `B = L R`
    (`W_Q W_K^T` for Q, `W_K W_Q^T` for K, `W_V W_O` for V), each factor `d_head` wide. With
    `W_V = Q1 S1` and `R^T = P2 T2` (QR: Q1 and P2 with orthonormal columns), `|A|_F` is the
    norm of `S1 W_O`, `|B|_F` that of `L T2^T`, and `|A B|_F` that of the `d_head x d_head`
    product of the two: no `d_model x d_model` matrix is formed, and the products of one
    earlier layer with all later ones are one matrix product."""
    if mode not in COMPOSITIONS:
        raise ValueError(f"mode must be one of {', '.join(COMPOSITIONS)}, not {mode!r}")
    cfg = model.cfg
    earlier, later = [], []  # per layer: S1 W_O ([head, e, d]) and L T2^T ([head, d, e])
    for block in model.blocks:
        a = block.attn
        w_q, w_k, w_v, w_o = (w.float() for w in (a.W_Q, a.W_K, a.W_V, a.W_O))
        earlier.append(torch.linalg.qr(w_v)[1] @ w_o)
        left, right = {"Q": (w_q, w_k.transpose(1, 2)), "K": (w_k, w_q.transpose(1, 2))}.get(
            mode, (w_v, w_o)
        )
        later.append(left @ torch.linalg.qr(right.transpose(1, 2))[1].transpose(1, 2))
    out = torch.zeros(cfg.n_layers, cfg.n_heads, cfg.n_layers, cfg.n_heads)
    for first in range(cfg.n_layers - 1):
        x = earlier[first]
        y = torch.stack(later[first + 1 :])  # [later layer, head', d, e]
        core = torch.einsum("hed,lgdf->hlgef", x, y)
        norms = torch.linalg.matrix_norm(core)  # [head, later layer, head']
        norm_x = torch.linalg.matrix_norm(x)[:, None, None]
        out[first, :, first + 1 :] = (norms / norm_x / torch.linalg.matrix_norm(y)[None]).cpu()
    return out
