"""`workbench zoo train TASK`: train a zoo model and save checkpoints along the way.

Training is AdamW on the next-token loss (over the positions a task's `loss_mask` selects), plus,
for tasks that ask for it, a group-lasso penalty over attention heads (Yuan and Lin 2006): the
sum over heads of the L2 norm of each head's OV weights (`W_V`, `W_O`) and, with a smaller
coefficient, of its QK weights (`W_Q`, `W_K`). An L2 penalty (weight decay) is indifferent to
splitting a job over several heads; the group norm is not, because a head's output is bilinear in
its `W_V` and `W_O`: one head doing the job costs less than two heads doing half of it each. Heads
then compete, the losers' weights go to zero (their output vanishes, then their attention becomes
uniform), and the task is left to a few heads whose attention patterns say what they do. This
makes the `induction` zoo's circuit small and known from attention patterns alone.
"""

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from tqdm.auto import tqdm

from workbench.errors import BadInput
from workbench.models import zoo_format
from workbench.zoo import induction, ioi
from workbench.zoo.vocab import WORDS, build_word_tokenizer, word_ids

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    task: str = "induction"
    out: str = "data/zoo"
    steps: int = 1000
    save_every: int = 100
    seed: int = 0
    batch_size: int = 32
    lr: float | None = None  # None: the task's default
    weight_decay: float = 0.1
    head_ov_l1: float | None = None  # group-lasso coefficients; None: the task's defaults
    head_qk_l1: float | None = None
    device: str = "cpu"  # the zoo is tiny: the CPU is fast and deterministic given the seed
    dtype: str = "float32"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class ZooTask:
    model_config: dict[str, Any]
    words: list[str]
    make_batch: Callable[[Any, int, torch.Generator], torch.Tensor]
    loss_mask: Callable[[torch.Tensor], torch.Tensor] | None = None
    lr: float = 1e-3
    head_ov_l1: float = 0.0
    head_qk_l1: float = 0.0


def _induction_batch(tokenizer: Any, batch: int, generator: torch.Generator) -> torch.Tensor:
    return induction.repeated_sequences(
        torch.tensor(word_ids(tokenizer)),
        batch=batch,
        n_ctx=int(induction.MODEL_CONFIG["n_ctx"]),  # type: ignore[call-overload]
        bos_id=tokenizer.bos_token_id,
        periods=induction.TRAIN_PERIODS,
        max_offset=10,
        generator=generator,
    )


ZOO_TASKS: dict[str, ZooTask] = {
    "induction": ZooTask(
        induction.MODEL_CONFIG,
        WORDS,
        _induction_batch,
        induction.predictable_mask,
        **induction.TRAINING,
    ),
    "ioi": ZooTask(ioi.MODEL_CONFIG, ioi.WORDS, ioi.ioi_batch, ioi.answer_only_mask),
}


def save_steps(steps: int, save_every: int) -> list[int]:
    """Steps at which checkpoints are written: 0, every `save_every`, and the last."""
    marks = set(range(0, steps + 1, save_every)) | {0, steps}
    return sorted(marks)


def next_token_loss(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    mask_fn: Callable[[torch.Tensor], torch.Tensor] | None,
) -> torch.Tensor:
    """Mean next-token cross-entropy, over the positions `mask_fn` selects (all if None)."""
    log_probs = logits[:, :-1].log_softmax(-1)
    token_lp = log_probs.gather(-1, tokens[:, 1:, None])[..., 0]
    if mask_fn is None:
        return -token_lp.mean()
    mask = mask_fn(tokens).to(token_lp.dtype)
    return -(token_lp * mask).sum() / mask.sum().clamp(min=1)


def head_group_lasso(model: "HookedTransformer", *, ov: float, qk: float) -> torch.Tensor:
    """`ov * sum_heads ||(W_V, W_O)|| + qk * sum_heads ||(W_Q, W_K)||` over every layer."""

    def head_norms(*weights: torch.Tensor) -> Float[torch.Tensor, " n_heads"]:
        squares = sum(w.pow(2).flatten(1).sum(1) for w in weights)
        return (squares + 1e-12).sqrt()  # type: ignore[union-attr]

    total = model.W_E.new_zeros(())
    for block in model.blocks:
        attn = block.attn  # W_Q/W_K/W_V [n_heads, d_model, d_head], W_O [n_heads, d_head, d_model]
        if ov:
            total = total + ov * head_norms(attn.W_V, attn.W_O).sum()
        if qk:
            total = total + qk * head_norms(attn.W_Q, attn.W_K).sum()
    return total


def with_task_defaults(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with every unset (None) option taken from its task."""
    task = ZOO_TASKS[cfg.task]
    return replace(
        cfg,
        lr=task.lr if cfg.lr is None else cfg.lr,
        head_ov_l1=task.head_ov_l1 if cfg.head_ov_l1 is None else cfg.head_ov_l1,
        head_qk_l1=task.head_qk_l1 if cfg.head_qk_l1 is None else cfg.head_qk_l1,
    )


def train_zoo_model(cfg: TrainConfig) -> list[Path]:
    """Train the zoo model for `cfg.task`; returns the checkpoint directories written.

    Training runs on one CPU thread: multi-threaded reductions make the result depend on
    scheduling, and the zoo must be identical for a given seed.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(cfg)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: TrainConfig) -> list[Path]:
    if cfg.task not in ZOO_TASKS:
        raise BadInput(f"unknown zoo task {cfg.task!r} (known: {', '.join(sorted(ZOO_TASKS))})")
    if cfg.steps < 1 or cfg.save_every < 1:
        raise BadInput("--steps and --save-every must be positive")
    from workbench.models import engine

    cfg = with_task_defaults(cfg)
    assert cfg.lr is not None and cfg.head_ov_l1 is not None and cfg.head_qk_l1 is not None
    ov_l1, qk_l1 = cfg.head_ov_l1, cfg.head_qk_l1
    task = ZOO_TASKS[cfg.task]
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    tokenizer = build_word_tokenizer(task.words)
    model_cfg = {**task.model_config, "d_vocab": len(tokenizer), "seed": cfg.seed}
    device = engine.resolve_device(cfg.device)
    model = engine.place(engine.new_untrained(model_cfg), device, engine.resolve_dtype(cfg.dtype))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    run_dir = Path(cfg.out) / cfg.task
    marks = save_steps(cfg.steps, cfg.save_every)
    written: list[Path] = []
    recent: list[float] = []

    def save(step: int) -> None:
        loss = sum(recent) / len(recent) if recent else float("nan")
        meta = {"task": cfg.task, "step": step, "seed": cfg.seed, "train_loss": loss}
        meta["train_config"] = cfg.to_dict()
        out = run_dir / f"step_{step}"
        zoo_format.save_zoo_checkpoint(
            out, cfg_kwargs=model_cfg, state_dict=model.state_dict(), tokenizer=tokenizer, meta=meta
        )
        written.append(out)
        recent.clear()

    save(0)
    for step in tqdm(range(1, cfg.steps + 1), desc=f"train {cfg.task}", leave=False):
        tokens = task.make_batch(tokenizer, cfg.batch_size, generator).to(device)
        loss = next_token_loss(model(tokens), tokens, task.loss_mask)
        objective = loss + head_group_lasso(model, ov=ov_l1, qk=qk_l1) if ov_l1 or qk_l1 else loss
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        optimizer.step()
        recent.append(loss.item())
        if step in marks:
            save(step)
            logger.info("%s step %d: loss %.3f", cfg.task, step, recent[-1] if recent else loss)
    return written
