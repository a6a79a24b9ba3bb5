"""Training data for the `ioi` zoo model: synthetic indirect-object sentences.

"When Mary and John went to the store , John gave a drink to" -> " Mary". Two names appear in
the first clause; one of them (the subject, S) is repeated; the answer is the other (the
indirect object, IO). Predicting it needs the mechanism Wang et al. 2022 found in GPT-2 small
("Interpretability in the Wild"): notice which name is duplicated and move the other one to the
output. Three templates, 16 names, 8 places and 8 objects; the loss is taken on the answer only.
"""

from collections.abc import Sequence
from typing import Any

import torch

NAMES = (
    "Mary John Alice Bob Sarah Tom Anna James Emma David Laura Peter Kate Mark Lucy Paul".split()
)
PLACES = "store garden park school market beach office library".split()
OBJECTS = "drink book ball letter gift key flower apple".split()
TEMPLATES = [
    "When {A} and {B} went to the {place} , {S} gave a {obj} to",
    "After {A} and {B} got to the {place} , {S} handed a {obj} to",
    "While {A} and {B} were at the {place} , {S} passed a {obj} to",
]
TEMPLATE_WORDS = sorted({w for t in TEMPLATES for w in t.split() if not w.startswith("{")})
WORDS = NAMES + PLACES + OBJECTS + TEMPLATE_WORDS

MODEL_CONFIG = {
    "n_layers": 2,
    "d_model": 64,
    "n_heads": 4,
    "d_head": 16,
    "d_mlp": 256,
    "n_ctx": 32,
    "act_fn": "gelu",
    "normalization_type": "LN",
    "positional_embedding_type": "standard",
    "default_prepend_bos": True,
}


def sentence(template: int, a: str, b: str, s: str, place: str, obj: str) -> str:
    return TEMPLATES[template].format(A=a, B=b, S=s, place=place, obj=obj)


def ioi_batch(tokenizer, batch: int, generator: torch.Generator) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """[batch, 16]: `<bos>`, a 14-word IOI sentence, and the indirect object."""
    vocab = tokenizer.get_vocab()
    rows = []
    for _ in range(batch):

        def pick(seq: Sequence[Any]) -> Any:
            return seq[int(torch.randint(len(seq), (1,), generator=generator, device="cpu"))]

        first, second = (
            NAMES[int(i)] for i in torch.randperm(len(NAMES), generator=generator, device="cpu")[:2]
        )
        subject_first = bool(torch.randint(2, (1,), generator=generator, device="cpu"))
        subject, io = (first, second) if subject_first else (second, first)
        text = sentence(
            pick(range(len(TEMPLATES))), first, second, subject, pick(PLACES), pick(OBJECTS)
        )
        rows.append([tokenizer.bos_token_id] + [vocab[w] for w in text.split()] + [vocab[io]])
    return torch.tensor(rows, device="cpu")


def answer_only_mask(tokens: torch.Tensor) -> torch.Tensor:
    """[batch, pos-1]: True at the last prediction (the indirect object) only."""
    mask = torch.zeros(tokens.shape[0], tokens.shape[1] - 1, dtype=torch.bool, device=tokens.device)
    mask[:, -1] = True
    return mask
