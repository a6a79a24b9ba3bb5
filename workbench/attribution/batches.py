"""Prompt batches and the logit-difference metric shared by every method.

Prompts of one task may differ in length across lines; they are grouped into batches of one
length. Every method sums per-prompt quantities over batches and divides by the number of
prompts, so results equal those of one batch holding every prompt.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int

from workbench.tasks.spec import Task

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


@dataclass(frozen=True)
class PromptBatch:
    clean: Int[torch.Tensor, "batch pos"]
    corrupt: Int[torch.Tensor, "batch pos"]
    answer: Int[torch.Tensor, " batch"]
    wrong: Int[torch.Tensor, " batch"]

    @property
    def size(self) -> int:
        return int(self.clean.shape[0])


def make_batches(
    task: Task, *, max_batch: int = 64, device: torch.device | str = "cpu"
) -> list[PromptBatch]:
    """The task's prompts as token tensors on `device` (the model's), grouped by length."""
    batches = []
    for idx in task.length_groups(max_batch):
        pairs = [task.pairs[i] for i in idx]
        batches.append(
            PromptBatch(
                clean=torch.tensor([p.clean_tokens for p in pairs], device=device),
                corrupt=torch.tensor([p.corrupt_tokens for p in pairs], device=device),
                answer=torch.tensor([p.answer for p in pairs], device=device),
                wrong=torch.tensor([p.wrong for p in pairs], device=device),
            )
        )
    return batches


def logit_diff(
    logits: Float[torch.Tensor, "batch pos d_vocab"],
    answer: Int[torch.Tensor, " batch"],
    wrong: Int[torch.Tensor, " batch"],
) -> Float[torch.Tensor, " batch"]:
    """Per prompt: logit(answer) - logit(wrong) at the last position."""
    last = logits[:, -1, :]
    return last.gather(1, answer[:, None])[:, 0] - last.gather(1, wrong[:, None])[:, 0]


def final_logit_diff(
    model: "HookedTransformer",
    resid_final: Float[torch.Tensor, "batch pos d_model"],
    answer: Int[torch.Tensor, " batch"],
    wrong: Int[torch.Tensor, " batch"],
) -> Float[torch.Tensor, " batch"]:
    """`logit_diff` from the final residual stream, unembedding only the last position and the
    two tokens compared: the same numbers as the full logits, without the `d_vocab`-wide matmul
    over every position."""
    last = final_norm(model, resid_final[:, -1:, :])[:, 0]  # [b, d_model]
    direction = model.W_U[:, answer] - model.W_U[:, wrong]  # [d_model, b]
    return torch.einsum("bd,db->b", last, direction) + model.b_U[answer] - model.b_U[wrong]


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's weights are: every tensor a method makes for it goes there."""
    return next(model.parameters()).device


def final_norm(
    model: "HookedTransformer", resid: Float[torch.Tensor, "batch pos d_model"]
) -> Float[torch.Tensor, "batch pos d_model"]:
    """The model's final normalisation (LayerNorm or RMSNorm, folded or not), or the identity
    for a model without one (`normalization_type` None)."""
    ln_final = getattr(model, "ln_final", None)
    return resid if ln_final is None else ln_final(resid)


def repeat_rows(batch_values: torch.Tensor, copies: int) -> torch.Tensor:
    """[b, ...] -> [copies * b, ...], copy-major (rows k*b .. k*b+b-1 are copy k)."""
    return batch_values.repeat(copies, *([1] * (batch_values.dim() - 1)))
