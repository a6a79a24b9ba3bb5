"""`workbench run catalogue`: every head's catalogue scores (`workbench.catalogue.scores`) at
each chosen checkpoint, computed without holding the database, then stored in one short
transaction. Cached by catalogue_id (checkpoint, dtype, the sequences' count, length and seed):
a catalogue already stored is not computed again unless `force`.

The sequences are `n_sequences` draws of `length` tokens, each followed by itself once more,
after the tokenizer's BOS where the model prepends one: tokens drawn uniformly from the
vocabulary less the tokenizer's special tokens. The default length is the longest up to 50
that fits the model's context twice. Bad values (fewer than 1 sequence, a length below 2, a
seed out of range) are `BadInput` before any model loads, a length too long for the context as
soon as the checkpoint is loaded; in every case nothing is stored.
"""

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from tqdm.auto import tqdm

from workbench.catalogue import maps, scores
from workbench.catalogue.maps import Relation
from workbench.catalogue.scores import PATTERN_SCORES
from workbench.core import Node, utc_now
from workbench.errors import BadInput
from workbench.hashing import sha256_json
from workbench.models import load_checkpoint, resolve_checkpoints
from workbench.models.base import LoadedModel, token_texts
from workbench.models.sources import select_checkpoints
from workbench.rows import loaded_rows
from workbench.store import Store

logger = logging.getLogger(__name__)

DEFAULT_SEQUENCES = 16
MAX_DEFAULT_LENGTH = 50
HEAD_SCORES = (*PATTERN_SCORES, "retrieval", "copying")  # besides a relation's `maps:` scores
NEEDLE = 8  # tokens of a retrieval prompt's needle
CUE = 2  # of which the prompt ends with the first ones
MAX_NEEDLE_CONTEXT = 64  # tokens of a retrieval prompt and its answer, by default


@dataclass(frozen=True)
class CatalogueParams:
    """What a catalogue's numbers depend on besides the checkpoint (all in its id)."""

    n_sequences: int
    length: int  # tokens per half of a sequence
    seed: int
    dtype: str
    bos: int | None  # the token every sequence starts with, if any
    vocabulary: int  # how many token ids the draws come from
    needle_context: int  # tokens of a retrieval prompt with its answer
    needle: int = NEEDLE
    cue: int = CUE
    # per relation: name, k, and the pairs given and used (one token each); the pairs' sha256
    relations: tuple[dict[str, Any], ...] = ()


def option_problem(
    n_sequences: int, length: int | None, seed: int, needle_context: int | None = None
) -> tuple[str, int, str] | None:
    """The first option a catalogue cannot take, as (its name, its value, why), or None."""
    if n_sequences < 1:
        return "sequences", n_sequences, "must be 1 or more"
    if length is not None and length < 2:
        return "length", length, "must be 2 or more"
    if needle_context is not None and needle_context < 2 * NEEDLE + 2:
        return "needle-context", needle_context, f"must be {2 * NEEDLE + 2} or more"
    if not 0 <= seed < 2**63:
        return "seed", seed, "must be between 0 and 2**63 - 1"
    return None


def catalogue_id(checkpoint_id: str, params: CatalogueParams) -> str:
    """`c-` and the first 12 hex digits of the sha256 of (checkpoint, params)."""
    return "c-" + sha256_json({"checkpoint": checkpoint_id, **asdict(params)})[:12]


def draw_vocabulary(loaded: LoadedModel) -> list[int]:
    """The token ids sequences are drawn from: the model's vocabulary less its tokenizer's
    special tokens (and ids the tokenizer does not have)."""
    size = loaded.model.cfg.d_vocab
    tokenizer = loaded.tokenizer
    if tokenizer is None:
        return list(range(size))
    special = set(tokenizer.all_special_ids)
    return [i for i in range(min(size, len(tokenizer))) if i not in special]


def catalogue_params(
    loaded: LoadedModel,
    *,
    n_sequences: int,
    length: int | None,
    seed: int,
    dtype: str,
    needle_context: int | None = None,
    relations: Sequence[Relation] = (),
) -> CatalogueParams:
    """The params of this checkpoint's catalogue; BadInput for values it cannot take."""
    bos = loaded.bos_token_id if loaded.prepend_bos else None
    n_ctx = loaded.model.cfg.n_ctx
    room = n_ctx - (bos is not None)
    if length is None:
        length = min(MAX_DEFAULT_LENGTH, room // 2)
    if length < 2 or 2 * length > room:
        raise BadInput(
            f"--length {length}: each sequence is twice its length"
            f"{' plus BOS' if bos is not None else ''}, which must fit the model's context "
            f"of {loaded.model.cfg.n_ctx} tokens (n_ctx), with a length of at least 2"
        )
    context = min(n_ctx, MAX_NEEDLE_CONTEXT) if needle_context is None else needle_context
    if context > n_ctx or context - (bos is not None) < 2 * NEEDLE + 1:
        raise BadInput(
            f"--needle-context {context}: a retrieval prompt and its answer hold two needles of "
            f"{NEEDLE} tokens and at least one haystack token"
            f"{' plus BOS' if bos is not None else ''}, within the model's context of "
            f"{n_ctx} tokens (n_ctx)"
        )
    return CatalogueParams(
        n_sequences,
        length,
        seed,
        dtype,
        bos,
        len(draw_vocabulary(loaded)),
        context,
        relations=tuple(_relation_params(loaded, r) for r in relations),
    )


def _relation_params(loaded: LoadedModel, relation: Relation) -> dict[str, Any]:
    """A relation as the params record it; BadInput when the checkpoint cannot score it."""
    if loaded.tokenizer is None:
        raise BadInput(
            f"relation {relation.name!r}: {loaded.checkpoint.checkpoint_id} has no tokenizer "
            "to read its tokens with"
        )
    sources, _ = maps.single_tokens(relation, loaded.tokenizer)
    if not sources:
        raise BadInput(
            f"relation {relation.name!r}: none of its {len(relation.pairs)} pairs is one token "
            f"on each side in {loaded.checkpoint.checkpoint_id}'s tokenizer"
        )
    return {
        "name": relation.name,
        "k": relation.k,
        "pairs": len(relation.pairs),
        "used": len(sources),
        "sha256": sha256_json([list(p) for p in relation.pairs]),
    }


def catalogue_rows(
    loaded: LoadedModel,
    params: CatalogueParams,
    cid: str,
    relations: Sequence[Relation] = (),
) -> dict[str, list[dict[str, Any]]]:
    """The rows of one catalogue: `head_catalogue` (a head's score by name, with each
    relation's `maps:` and `maps_suppression:` scores), `head_composition` (Q, K and V
    composition into every head of a later layer) and `head_mappings` (each head's top token
    mappings)."""
    model = loaded.model
    checkpoint_id = loaded.checkpoint.checkpoint_id
    vocabulary = draw_vocabulary(loaded)
    tokens = scores.repeated_tokens(
        vocabulary,
        n_sequences=params.n_sequences,
        half=params.length,
        bos=params.bos,
        seed=params.seed,
    )
    steps = ["patterns", "retrieval", "copying", "mappings", *relations]
    steps += [f"{mode}-composition" for mode in scores.COMPOSITIONS]
    progress = tqdm(total=len(steps), desc="catalogue", leave=False)
    by_name = scores.pattern_scores(model, tokens)
    progress.update()
    needles = scores.needle_prompts(
        vocabulary,
        n_prompts=params.n_sequences,
        context=params.needle_context,
        needle=params.needle,
        cue=params.cue,
        bos=params.bos,
        seed=params.seed,
    )
    by_name["retrieval"] = scores.retrieval_scores(model, needles)
    progress.update()
    by_name["copying"] = scores.copying_scores(model)
    progress.update()
    mappings = _mapping_rows(loaded, vocabulary, cid)
    progress.update()
    for relation in relations:
        sources, targets = maps.single_tokens(relation, loaded.tokenizer)
        promoted, suppressed = maps.relation_scores(model, sources, targets, relation.k)
        by_name[f"maps:{relation.name}"] = promoted
        by_name[f"maps_suppression:{relation.name}"] = suppressed
        progress.update()
    heads = [
        {
            "catalogue_id": cid,
            "checkpoint_id": checkpoint_id,
            "node_id": Node.head_of(layer, head).id,
            "layer": layer,
            "head": head,
            "score": name,
            "value": float(by_name[name][layer, head]),
        }
        for name in by_name
        for layer in range(model.cfg.n_layers)
        for head in range(model.cfg.n_heads)
    ]
    composition = []
    for mode in scores.COMPOSITIONS:
        values = scores.composition_scores(model, mode)
        for src_layer in range(model.cfg.n_layers - 1):
            block = values[src_layer, :, src_layer + 1 :].tolist()  # [head, later layer, head']
            for src_head, rows in enumerate(block):
                src = Node.head_of(src_layer, src_head).id
                for offset, row in enumerate(rows):
                    dst_layer = src_layer + 1 + offset
                    composition += [
                        {
                            "catalogue_id": cid,
                            "checkpoint_id": checkpoint_id,
                            "mode": mode,
                            "src": src,
                            "dst": Node.head_of(dst_layer, dst_head).id,
                            "value": value,
                        }
                        for dst_head, value in enumerate(row)
                    ]
        progress.update()
    progress.close()
    return {"head_catalogue": heads, "head_composition": composition, "head_mappings": mappings}


def _mapping_rows(loaded: LoadedModel, vocabulary: list[int], cid: str) -> list[dict[str, Any]]:
    """`maps.top_mappings` as `head_mappings` rows, each token with its text."""
    rows = maps.top_mappings(loaded.model, vocabulary)
    ids = sorted({r[k] for r in rows for k in ("src_token", "dst_token")})
    if loaded.tokenizer is None:
        texts = {i: f"<{i}>" for i in ids}
    else:
        texts = dict(zip(ids, token_texts(loaded.tokenizer, ids), strict=True))
    checkpoint_id = loaded.checkpoint.checkpoint_id
    return [
        {
            "catalogue_id": cid,
            "checkpoint_id": checkpoint_id,
            "node_id": Node.head_of(r["layer"], r["head"]).id,
            **{k: v for k, v in r.items() if k not in ("layer", "head")},
            "src_text": texts[r["src_token"]],
            "dst_text": texts[r["dst_token"]],
        }
        for r in rows
    ]


def run_catalogue(
    model: str,
    *,
    checkpoint: str = "latest",
    n_sequences: int = DEFAULT_SEQUENCES,
    length: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    dtype: str = "float32",
    db: str | None = None,
    force: bool = False,
    needle_context: int | None = None,
    relations: str | None = None,
) -> list[tuple[str, str]]:
    """[(catalogue_id, 'done' or 'cached')] per checkpoint; `relations`: a JSONL file of
    relations to score heads on (`maps.read_relations`)."""
    problem = option_problem(n_sequences, length, seed, needle_context)
    if problem is not None:
        name, value, why = problem
        raise BadInput(f"--{name} {value}: {why}")
    named = maps.read_relations(relations) if relations is not None else []
    refs = select_checkpoints(resolve_checkpoints(model), checkpoint)
    done: list[tuple[str, str]] = []
    for ref in tqdm(refs, desc="catalogue checkpoints", disable=len(refs) < 2):
        loaded = load_checkpoint(ref, device=device, dtype=dtype)
        done.append(
            store_catalogue(
                loaded,
                n_sequences,
                length,
                seed,
                dtype,
                db,
                force,
                needle_context=needle_context,
                relations=named,
            )
        )
    return done


def store_catalogue(
    loaded: LoadedModel,
    n_sequences: int,
    length: int | None,
    seed: int,
    dtype: str,
    db: str | None,
    force: bool,
    *,
    lock_wait: float | None = None,
    needle_context: int | None = None,
    relations: Sequence[Relation] = (),
) -> tuple[str, str]:
    """Compute and store one loaded checkpoint's catalogue unless it is stored already (and not
    `force`): (catalogue_id, 'done' or 'cached'). `lock_wait`: how long a write waits for
    another process's lock on the database (`Store`)."""
    params = catalogue_params(
        loaded, n_sequences=n_sequences, length=length, seed=seed, dtype=dtype,
        needle_context=needle_context, relations=relations,
    )  # fmt: skip
    checkpoint_id = loaded.checkpoint.checkpoint_id
    cid = catalogue_id(checkpoint_id, params)
    if not force:
        with Store(db, lock_wait=lock_wait) as store:
            if store.has_catalogue(cid):
                logger.info("catalogue %s at %s: stored already", cid, checkpoint_id)
                return cid, "cached"
    started = time.perf_counter()
    rows = catalogue_rows(loaded, params, cid, relations)
    head = {
        "catalogue_id": cid,
        "checkpoint_id": checkpoint_id,
        "params": asdict(params),
        "seconds": time.perf_counter() - started,
        "created_at": utc_now(),
    }
    with Store(db, lock_wait=lock_wait) as store:
        store.save_catalogue(head, rows, loaded_rows(loaded))
    logger.info("catalogue %s at %s: stored", cid, checkpoint_id)
    return cid, "done"
