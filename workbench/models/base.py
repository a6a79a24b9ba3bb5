"""The model interface the pipelines see: a loaded HookedTransformer with its provenance."""

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from workbench.errors import BadInput

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer
    from transformers import PreTrainedTokenizerBase

SourceKind = Literal["zoo", "hf", "tl"]


@dataclass(frozen=True)
class CheckpointRef:
    """Where one checkpoint lives, before it is loaded."""

    kind: SourceKind
    location: str  # a directory for zoo/hf, a model name for tl
    model_id: str
    step: int
    checkpoint_index: int | None = None  # TransformerLens checkpoint index (tl only)
    source: str = ""  # the training run directory (zoo/hf) or the model name (tl)

    @property
    def checkpoint_id(self) -> str:
        return f"{self.model_id}@{self.step}"


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    source: str
    architecture: str
    n_layers: int
    n_heads: int
    d_model: int
    d_vocab: int
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckpointInfo:
    checkpoint_id: str
    model_id: str
    step: int
    path: str
    sha256: str
    train_loss: float | None = None  # the training loss logged at this checkpoint, if any


def token_texts(tokenizer: "PreTrainedTokenizerBase", ids: list[int]) -> list[str]:
    """The text of each token as the tokenizer decodes it alone (" Paris", where the tokenizer's
    own piece is "ĠParis"): what TransformerLens's `to_str_tokens` and circuit-tracer show. A
    byte-level token that is part of a character decodes to U+FFFD."""
    decoded = tokenizer.batch_decode([[int(i)] for i in ids], clean_up_tokenization_spaces=False)
    return [str(t) for t in decoded]


@dataclass
class LoadedModel:
    """A HookedTransformer plus the tokenizer and provenance the store needs."""

    model: "HookedTransformer"
    tokenizer: "PreTrainedTokenizerBase | None"
    info: ModelInfo
    checkpoint: CheckpointInfo

    @property
    def prepend_bos(self) -> bool:
        return bool(self.model.cfg.default_prepend_bos) and self.bos_token_id is not None

    @property
    def bos_token_id(self) -> int | None:
        if self.tokenizer is None:
            return None
        return self.tokenizer.bos_token_id

    def encode(self, text: str, *, prompt: bool = True) -> list[int]:
        """Token ids of `text`; prompts get the model's BOS token when it uses one."""
        if self.tokenizer is None:
            raise BadInput(
                f"model {self.info.model_id} has no tokenizer: use a task file with token ids "
                "(clean_ids, corrupt_ids, answer_id, wrong_id)"
            )
        ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        if prompt and self.prepend_bos:
            ids = [int(self.bos_token_id)] + ids  # type: ignore[arg-type]
        return ids

    def token_strs(self, ids: list[int]) -> list[str]:
        """Each token's text (`token_texts`); a model without a tokenizer gives the ids."""
        if self.tokenizer is None:
            return [str(i) for i in ids]
        return token_texts(self.tokenizer, ids)

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return " ".join(str(i) for i in ids)
        return str(self.tokenizer.decode(ids))
