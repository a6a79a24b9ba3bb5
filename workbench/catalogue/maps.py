"""What a head's parameters map tokens to, with no input ("Inferring Functionality of Attention
Heads from their Parameters", Elhelo & Geva 2024: MAPS).

A head's OV circuit maps a source token's embedding `e` to logits `e W_V W_O W_U`, and its QK
circuit scores a query token against a key token by `e_q W_Q W_K^T e_k^T`. The embedding is the
token's row of `W_E`; in a model with MLPs, for heads after layer 0 it is the first MLP's output
on that row (after the first block's second normalisation), as MAPS takes it, since the first
MLP acts as an extended embedding. Biases and positions are left out.

* **Relation scores.** A relation is a list of (source, target) token pairs a user names (a
  JSONL line `{"relation": ..., "pairs": [[a, b], ...]}`, optional `"k"`). A head's score is
  the share of pairs whose target is among the `k` tokens the head's OV circuit maps the source
  to most (MAPS's relation score), and its suppression score the same for the `k` it maps the
  source to least. Pairs whose source or target is not one token of the model's tokenizer are
  left out, as MAPS leaves them out; how many is stored with the catalogue.
* **Top mappings.** For each head and each circuit, the `n_tokens` source (OV) or query (QK)
  tokens the circuit amplifies most (the norm of `e W_V W_O`, or of `e W_Q W_K^T`, over the
  norm of `e`) and, for each, the `n_mappings` target (OV) or key (QK) tokens it maps them to
  most.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformer_lens import HookedTransformer

from workbench.errors import BadInput, read_text

DEFAULT_K = 10  # MAPS's k for a relation other than copying (1 there)
TOP_TOKENS = 5  # source (or query) tokens per head and circuit
TOP_MAPPINGS = 5  # target (or key) tokens per source token
MAX_RELATIONS_BYTES = 64 * 2**20  # a relations file larger than this is refused


@dataclass(frozen=True)
class Relation:
    """A named relation between tokens, as a user's JSONL line gives it."""

    name: str
    pairs: tuple[tuple[str, str], ...]
    k: int


def read_relations(path: str | Path) -> list[Relation]:
    """The relations of a JSONL file, one per line; BadInput names the file, the line and the
    field for anything else (a blank line is skipped)."""
    file = Path(path)
    lines = read_text(file, max_bytes=MAX_RELATIONS_BYTES).splitlines()
    relations: list[Relation] = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            relations.append(_relation(json_line(file, number, line), f"{file}:{number}"))
    if not relations:
        raise BadInput(f"{file}: no relations (one JSON object per line)")
    names = [r.name for r in relations]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise BadInput(f"{file}: relation {twice[0]!r} is named on more than one line")
    return relations


def json_line(file: Path, number: int, line: str) -> dict[str, Any]:
    """One JSONL line as an object; BadInput naming the file and line otherwise."""
    try:
        data = json.loads(line)
    except json.JSONDecodeError as err:
        raise BadInput(f"{file}:{number}: not valid JSON ({err.msg})") from err
    except (ValueError, RecursionError) as err:
        raise BadInput(f"{file}:{number}: not usable JSON") from err
    if not isinstance(data, dict):
        raise BadInput(f"{file}:{number}: expected a JSON object")
    return data


def _relation(data: dict[str, Any], where: str) -> Relation:
    unknown = sorted(set(data) - {"relation", "pairs", "k"})
    if unknown:
        raise BadInput(f"{where}: unknown field {unknown[0]!r} (relation, pairs, k)")
    name = data.get("relation")
    if not isinstance(name, str) or not name.strip() or len(name) > 100:
        raise BadInput(f"{where}: field 'relation' must be a name of 1 to 100 characters")
    pairs = data.get("pairs")
    if not isinstance(pairs, list) or not pairs:
        raise BadInput(f"{where}: field 'pairs' must be a non-empty list of [source, target]")
    for i, pair in enumerate(pairs):
        if not (
            isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) for t in pair)
        ):
            raise BadInput(f"{where}: pairs[{i}] must be [source, target], two strings")
    k = data.get("k", DEFAULT_K)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 1000:
        raise BadInput(f"{where}: field 'k' must be a whole number from 1 to 1000")
    return Relation(name.strip(), tuple((a, b) for a, b in pairs), k)


def single_tokens(relation: Relation, tokenizer: Any) -> tuple[list[int], list[int]]:
    """The relation's pairs whose source and target are each one token of `tokenizer`, as
    (source ids, target ids)."""
    sources, targets = [], []
    for a, b in relation.pairs:
        ia = tokenizer.encode(a, add_special_tokens=False)
        ib = tokenizer.encode(b, add_special_tokens=False)
        if len(ia) == 1 and len(ib) == 1:
            sources.append(ia[0])
            targets.append(ib[0])
    return sources, targets


def embeddings(model: HookedTransformer, tokens: torch.Tensor, layer: int) -> torch.Tensor:
    """The rows of `W_E` for `tokens`, through the first MLP for heads after layer 0 in a model
    with MLPs (MAPS's embedding of a token for a head)."""
    rows = model.W_E[tokens].float()
    if layer == 0 or model.cfg.attn_only:
        return rows
    block = model.blocks[0]
    return block.mlp(block.ln2(rows[None].to(model.W_E.dtype)))[0].float()


@torch.no_grad()
def relation_scores(
    model: HookedTransformer, sources: list[int], targets: list[int], k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each head's ([layer, head]) share of pairs whose target is among the `k` tokens its OV
    circuit maps the source to most, and among the `k` it maps it to least."""
    cfg = model.cfg
    device = model.W_E.device
    src = torch.tensor(sources, device=device)
    dst = torch.tensor(targets, device=device)[:, None]
    w_u = model.W_U.float()
    k = min(k, cfg.d_vocab)
    promoted = torch.zeros(cfg.n_layers, cfg.n_heads)
    suppressed = torch.zeros(cfg.n_layers, cfg.n_heads)
    first = embeddings(model, src, 0)
    later = embeddings(model, src, 1) if cfg.n_layers > 1 else first
    for layer, block in enumerate(model.blocks):
        rows = first if layer == 0 else later
        w_v, w_o = block.attn.W_V.float(), block.attn.W_O.float()  # [head, d, e], [head, e, d]
        for head in range(cfg.n_heads):
            logits = rows @ w_v[head] @ w_o[head] @ w_u  # [pair, vocab]
            top = logits.topk(k, dim=-1).indices
            bottom = (-logits).topk(k, dim=-1).indices
            promoted[layer, head] = (top == dst).any(-1).float().mean().cpu()
            suppressed[layer, head] = (bottom == dst).any(-1).float().mean().cpu()
    return promoted, suppressed


@torch.no_grad()
def top_mappings(
    model: HookedTransformer,
    vocabulary: list[int],
    *,
    n_tokens: int = TOP_TOKENS,
    n_mappings: int = TOP_MAPPINGS,
) -> list[dict[str, Any]]:
    """Per head and circuit (`OV`, `QK`): the `n_tokens` tokens of `vocabulary` the circuit
    amplifies most and, for each, the `n_mappings` tokens of `vocabulary` it maps them to most,
    as rows (layer, head, circuit, src_rank, src_token, amplification, rank, dst_token,
    value)."""
    cfg = model.cfg
    device = model.W_E.device
    ids = torch.tensor(vocabulary, device=device)
    w_u = model.W_U.float()[:, ids]  # logits of the vocabulary's tokens only
    rows: list[dict[str, Any]] = []
    first = embeddings(model, ids, 0)
    later = embeddings(model, ids, 1) if cfg.n_layers > 1 else first
    n_top = min(n_tokens, len(vocabulary))
    n_mapped = min(n_mappings, len(vocabulary))
    group = cfg.n_heads // (cfg.n_key_value_heads or cfg.n_heads)  # query heads per value head
    for layer, block in enumerate(model.blocks):
        e = first if layer == 0 else later  # [token, d]
        norms = e.norm(dim=-1).clamp_min(1e-12)
        attn = block.attn
        w_q, w_k, w_o = attn.W_Q.float(), attn.W_K.float(), attn.W_O.float()
        w_v = getattr(attn, "_W_V", attn.W_V).float()  # [value head, d, e]: once per group
        # e W_V and e W_Q of every head of the layer, one product each
        by_value = torch.einsum("td,hde->hte", e, w_v)
        by_query = torch.einsum("td,hde->hte", e, w_q)
        for head in range(cfg.n_heads):
            # each circuit is e A B with A, B one head wide: |e A B| from e A and B B^T alone
            factors = {
                "OV": (by_value[head // group], w_o[head]),
                "QK": (by_query[head], w_k[head].T),
            }
            for name, (narrow, b) in factors.items():
                amplification = ((narrow @ (b @ b.T)) * narrow).sum(-1).clamp_min(0).sqrt()
                amplification = amplification / norms
                top = amplification.topk(n_top).indices
                moved = narrow[top] @ b  # [n_top, d]
                mapped = moved @ w_u if name == "OV" else moved @ e.T
                values, targets = mapped.topk(n_mapped)
                for src_rank, src in enumerate(top.tolist()):
                    for rank in range(n_mapped):
                        rows.append(
                            {
                                "layer": layer,
                                "head": head,
                                "circuit": name,
                                "src_rank": src_rank,
                                "src_token": vocabulary[src],
                                "amplification": float(amplification[src]),
                                "rank": rank,
                                "dst_token": vocabulary[int(targets[src_rank, rank])],
                                "value": float(values[src_rank, rank]),
                            }
                        )
    return rows
