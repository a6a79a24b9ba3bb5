"""The task metrics (`workbench.core.METRICS`), each in two forms: from full logits, and from the
final residual stream (unembedding only the last position). Every method evaluates its task's
metric through `PromptBatch.metric`, so choosing a metric changes no method.

All are means over prompts of a per-prompt value at the last position:

* `logit_diff`: logit(answer) - logit(wrong). Its residual form unembeds only the two tokens.
* `prob_diff`: p(answer) - p(wrong), softmax over the whole vocabulary.
* `logprob`: log p(answer).
* `kl`: KL(p_clean || p) of the next-token distribution, against the clean run of the same
  prompt (`Target.clean_logprobs`, computed once per batch); 0 on the clean run, lower is
  cleaner, so normalised scores still read as the fraction of the clean behaviour restored.
"""

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int

from workbench.core import metric_named

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


def repeat_rows(batch_values: torch.Tensor, copies: int) -> torch.Tensor:
    """[b, ...] -> [copies * b, ...], copy-major (rows k*b .. k*b+b-1 are copy k)."""
    return batch_values.repeat(copies, *([1] * (batch_values.dim() - 1)))


def final_norm(
    model: "HookedTransformer", resid: Float[torch.Tensor, "batch pos d_model"]
) -> Float[torch.Tensor, "batch pos d_model"]:
    """The model's final normalisation (LayerNorm or RMSNorm, folded or not), or the identity
    for a model without one (`normalization_type` None)."""
    ln_final = getattr(model, "ln_final", None)
    return resid if ln_final is None else ln_final(resid)


def last_position_logits(
    model: "HookedTransformer", resid: Float[torch.Tensor, "batch pos d_model"]
) -> Float[torch.Tensor, "batch 1 d_vocab"]:
    """The last position's logits from the final residual stream, computed as the model's
    forward pass computes every position's (final norm, unembedding, soft cap): what a metric
    reads, without a vocabulary-wide product at every other position."""
    from transformer_lens.utilities.activation_functions import apply_softcap

    last = resid[:, -1:, :]
    if model.cfg.normalization_type is not None:
        last = model.ln_final(last)
    return apply_softcap(model.unembed(last), model.cfg.output_logits_soft_cap)


def frozen_final_norm(
    model: "HookedTransformer", out: torch.Tensor, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """A component's output through the final normalisation linearised at a run: centred for
    a LayerNorm (whose weights are folded into the unembedding), divided by that run's final
    scale (`scale`; None for a model without one, or for directions taken per unit)."""
    if model.cfg.normalization_type in ("LN", "LNPre"):
        out = out - out.mean(-1, keepdim=True)
    return out if scale is None else out / scale


@dataclass(frozen=True)
class Target:
    """What a metric compares against, per prompt."""

    answer: Int[torch.Tensor, " batch"]
    wrong: Int[torch.Tensor, " batch"]
    clean_logprobs: Float[torch.Tensor, "batch d_vocab"] | None = None  # for `kl`

    def repeat(self, copies: int) -> "Target":
        ref = self.clean_logprobs
        return Target(
            repeat_rows(self.answer, copies),
            repeat_rows(self.wrong, copies),
            None if ref is None else repeat_rows(ref, copies),
        )


class TaskMetric:
    """A metric's per-prompt values. Subclasses define `of_last` (from last-position logits)."""

    name = ""
    needs_reference = False

    def of_last(
        self, last: Float[torch.Tensor, "batch d_vocab"], target: Target
    ) -> Float[torch.Tensor, " batch"]:
        raise NotImplementedError

    def __call__(
        self, logits: Float[torch.Tensor, "batch pos d_vocab"], target: Target
    ) -> Float[torch.Tensor, " batch"]:
        return self.of_last(logits[:, -1, :], target)

    def final(
        self,
        model: "HookedTransformer",
        resid_final: Float[torch.Tensor, "batch pos d_model"],
        target: Target,
    ) -> Float[torch.Tensor, " batch"]:
        """The metric from the final residual stream: the same numbers as from full logits,
        unembedding the last position only."""
        last = final_norm(model, resid_final[:, -1:, :])[:, 0]
        return self.of_last(last @ model.W_U + model.b_U, target)

    def unembed_grad(
        self,
        model: "HookedTransformer",
        x_last: Float[torch.Tensor, "batch d_model"],
        target: Target,
    ) -> Float[torch.Tensor, "batch d_model"]:
        """d metric / d (normalised final residual at the last position), per prompt."""
        with torch.enable_grad():
            x = x_last.detach().float().requires_grad_(True)
            logits = x @ model.W_U.float() + model.b_U.float()
            self.of_last(logits, target).sum().backward()
        assert x.grad is not None
        return x.grad.to(x_last.dtype)


def logit_diff(
    logits: Float[torch.Tensor, "batch pos d_vocab"],
    answer: Int[torch.Tensor, " batch"],
    wrong: Int[torch.Tensor, " batch"],
) -> Float[torch.Tensor, " batch"]:
    """Per prompt: logit(answer) - logit(wrong) at the last position."""
    last = logits[:, -1, :]
    return last.gather(1, answer[:, None])[:, 0] - last.gather(1, wrong[:, None])[:, 0]


class LogitDiff(TaskMetric):
    name = "logit_diff"

    def of_last(self, last: torch.Tensor, target: Target) -> torch.Tensor:
        return logit_diff(last[:, None, :], target.answer, target.wrong)

    def final(
        self, model: "HookedTransformer", resid_final: torch.Tensor, target: Target
    ) -> torch.Tensor:
        # only the two compared tokens' unembeddings: no d_vocab-wide matmul
        last = final_norm(model, resid_final[:, -1:, :])[:, 0]  # [b, d_model]
        direction = model.W_U[:, target.answer] - model.W_U[:, target.wrong]  # [d_model, b]
        projected = torch.einsum("bd,db->b", last, direction)
        return projected + model.b_U[target.answer] - model.b_U[target.wrong]  # in this order

    def unembed_grad(
        self, model: "HookedTransformer", x_last: torch.Tensor, target: Target
    ) -> torch.Tensor:
        return (model.W_U[:, target.answer] - model.W_U[:, target.wrong]).T


class ProbDiff(TaskMetric):
    name = "prob_diff"

    def of_last(self, last: torch.Tensor, target: Target) -> torch.Tensor:
        probs = last.float().softmax(-1)
        answer, wrong = target.answer[:, None], target.wrong[:, None]
        return (probs.gather(1, answer)[:, 0] - probs.gather(1, wrong)[:, 0]).to(last.dtype)


class LogProb(TaskMetric):
    name = "logprob"

    def of_last(self, last: torch.Tensor, target: Target) -> torch.Tensor:
        logprobs = last.float().log_softmax(-1)
        return logprobs.gather(1, target.answer[:, None])[:, 0].to(last.dtype)


class KL(TaskMetric):
    name = "kl"
    needs_reference = True

    def of_last(self, last: torch.Tensor, target: Target) -> torch.Tensor:
        ref = target.clean_logprobs
        if ref is None:
            raise ValueError("the kl metric needs the clean run's log-probabilities (a reference)")
        logprobs = last.float().log_softmax(-1)
        return (ref.exp() * (ref - logprobs)).sum(-1).to(last.dtype)


IMPLEMENTATIONS: dict[str, TaskMetric] = {
    m.name: m for m in (LogitDiff(), ProbDiff(), LogProb(), KL())
}


def task_metric(name: str) -> TaskMetric:
    metric_named(name)  # the vocabulary's check: one sentence naming the choices
    return IMPLEMENTATIONS[name]


def with_reference(target: Target, clean_last_logits: torch.Tensor) -> Target:
    return replace(target, clean_logprobs=clean_last_logits.float().log_softmax(-1).detach())
