"""Built-in tasks, generated for the model at hand.

`induction`: clean = `<bos>` + a segment A of distinct random tokens + the first `prefix`
tokens of A again; the answer is the next token of A. Corrupt = the same with the first copy
replaced by another segment B (the repeat broken); the wrong token is B's token at the answer's
place. Only an induction mechanism ([A][B] ... [A] -> [B]) separates the two. The period is
one the zoo never trained on (`workbench.zoo.induction.HELD_OUT_PERIODS`).
"""

from collections.abc import Callable

import torch

from workbench.errors import BadInput
from workbench.models.base import LoadedModel
from workbench.tasks.spec import PromptPair, Task

INDUCTION_PERIOD = 8
INDUCTION_PREFIX = 5
INDUCTION_PROMPTS = 32


def _ordinary_token_ids(model: LoadedModel) -> torch.Tensor:
    if model.tokenizer is None:
        return torch.arange(model.info.d_vocab, device="cpu")
    special = set(model.tokenizer.all_special_ids)
    vocab_ids = sorted(i for i in model.tokenizer.get_vocab().values() if i < model.info.d_vocab)
    return torch.tensor([i for i in vocab_ids if i not in special], device="cpu")


def induction_task(model: LoadedModel, *, n_prompts: int | None = None, seed: int = 0) -> Task:
    n = n_prompts or INDUCTION_PROMPTS
    period, prefix = INDUCTION_PERIOD, INDUCTION_PREFIX
    ids = _ordinary_token_ids(model)
    generator = torch.Generator().manual_seed(seed)
    bos = [model.bos_token_id] if model.prepend_bos and model.bos_token_id is not None else []
    pairs = []
    for _ in range(n):
        perm = ids[
            torch.randperm(ids.numel(), generator=generator, device="cpu")[: 2 * period]
        ].tolist()
        seg_a, seg_b = perm[:period], perm[period:]
        clean = bos + seg_a + seg_a[:prefix]
        corrupt = bos + seg_b + seg_a[:prefix]
        pairs.append(
            PromptPair(
                clean_tokens=clean,
                corrupt_tokens=corrupt,
                answer=seg_a[prefix],
                wrong=seg_b[prefix],
                clean_text=model.decode(clean) if model.tokenizer is not None else None,
                corrupt_text=model.decode(corrupt) if model.tokenizer is not None else None,
            )
        )
    spec = {"period": period, "prefix": prefix, "n_prompts": n, "seed": seed}
    return Task(name="induction", source="builtin:induction", pairs=pairs, spec=spec)


def ioi_task(model: LoadedModel, *, n_prompts: int | None = None, seed: int = 0) -> Task:
    """Indirect object identification (Wang et al. 2022) over the zoo's templates. Clean: "When
    Mary and John went to the store , John gave a drink to" (answer " Mary", wrong " John", the
    repeated subject). Corrupt: the two names of the first clause replaced by two other names
    (the "ABC" distribution), so no name is repeated and the indirect object is not in the
    sentence."""
    from workbench.zoo import ioi

    if model.tokenizer is None:
        raise BadInput(f"the ioi task needs a tokenizer, and model {model.info.model_id} has none")
    names = [n for n in ioi.NAMES if len(model.encode(" " + n, prompt=False)) == 1]
    if len(names) < 5:
        raise BadInput(
            f"the ioi task needs single-token names; model {model.info.model_id} has too few"
        )
    n = n_prompts or INDUCTION_PROMPTS
    generator = torch.Generator().manual_seed(seed)
    pairs = []
    for i in range(n):
        a, b, c, d = (
            names[int(j)] for j in torch.randperm(len(names), generator=generator, device="cpu")[:4]
        )
        subject, io = (a, b) if i % 2 else (b, a)
        template = i % len(ioi.TEMPLATES)
        place = ioi.PLACES[
            int(torch.randint(len(ioi.PLACES), (1,), generator=generator, device="cpu"))
        ]
        obj = ioi.OBJECTS[
            int(torch.randint(len(ioi.OBJECTS), (1,), generator=generator, device="cpu"))
        ]
        clean = ioi.sentence(template, a, b, subject, place, obj)
        corrupt = ioi.sentence(template, c, d, subject, place, obj)
        clean_ids, corrupt_ids = model.encode(clean), model.encode(corrupt)
        if len(clean_ids) != len(corrupt_ids):
            continue
        pairs.append(
            PromptPair(
                clean_tokens=clean_ids,
                corrupt_tokens=corrupt_ids,
                answer=model.encode(" " + io, prompt=False)[0],
                wrong=model.encode(" " + subject, prompt=False)[0],
                clean_text=clean,
                corrupt_text=corrupt,
            )
        )
    spec = {"n_prompts": len(pairs), "seed": seed, "templates": len(ioi.TEMPLATES)}
    return Task(name="ioi", source="builtin:ioi", pairs=pairs, spec=spec)


BUILTIN_TASKS: dict[str, Callable[..., Task]] = {"induction": induction_task, "ioi": ioi_task}


def induction_known_circuit(model: LoadedModel) -> set[tuple[str, str]] | None:
    """The induction circuit of a zoo induction model, read from its attention patterns
    (`workbench.zoo.ground_truth`); unknown for any other model."""
    if model.info.architecture != "zoo:induction" or model.tokenizer is None:
        return None
    from workbench.zoo.ground_truth import known_induction_edges

    return known_induction_edges(model)


def induction_training_corpus(
    model: LoadedModel, n_tokens: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(windows, loss mask): the zoo induction model's training sequences (the predictable
    tokens of a repeated segment masked in); None for any other model."""
    from workbench.zoo import induction

    if model.info.architecture != "zoo:induction":
        return None
    n_ctx = int(model.model.cfg.n_ctx)
    windows = induction.repeated_sequences(
        _ordinary_token_ids(model),
        batch=max(1, n_tokens // n_ctx),
        n_ctx=n_ctx,
        bos_id=int(model.bos_token_id or 0),
        periods=tuple(sorted(induction.TRAIN_PERIODS + induction.HELD_OUT_PERIODS)),
        max_offset=n_ctx // 4,
        generator=generator,
    )
    return windows, induction.predictable_mask(windows)


def ioi_training_corpus(
    model: LoadedModel, n_tokens: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(windows, loss mask): the zoo IOI model's training sentences (the indirect object
    masked in); None for any other model."""
    from workbench.zoo import ioi

    if model.info.architecture != "zoo:ioi" or model.tokenizer is None:
        return None
    length = ioi.ioi_batch(model.tokenizer, 1, torch.Generator()).shape[1]
    windows = ioi.ioi_batch(model.tokenizer, max(1, n_tokens // length), generator)
    return windows, ioi.answer_only_mask(windows)


# What a built-in task knows about the models it was made for, by task source: the circuit
# known to solve it, and the distribution the model was trained on.
KNOWN_CIRCUITS: dict[str, Callable[[LoadedModel], set[tuple[str, str]] | None]] = {
    "builtin:induction": induction_known_circuit,
}
TRAINING_CORPORA: dict[
    str, Callable[[LoadedModel, int, torch.Generator], tuple[torch.Tensor, torch.Tensor] | None]
] = {
    "builtin:induction": induction_training_corpus,
    "builtin:ioi": ioi_training_corpus,
}
