"""What training an SAE takes (no torch: the command line is built from it)."""

from dataclasses import asdict, dataclass
from typing import Any

from workbench.errors import BadInput
from workbench.registry import option

ARCHITECTURES = ("standard", "topk")
PRETRAINED_PREFIX = "pretrained:"  # --sae pretrained:<release>/<sae_id> (SAELens registry)


@dataclass(frozen=True)
class SaeTrainOptions:
    """The architecture and its sparsity, and the optimisation."""

    architecture: str = option(
        "topk", "SAE architecture: standard (L1) or topk.", choices=ARCHITECTURES
    )
    expansion: int = option(4, "d_sae = expansion * d_in (unless --d-sae).")
    d_sae: int | None = option(None, "Number of features.")
    k: int = option(8, "Active features of a topk SAE.")
    l1_coefficient: float = option(1.0, "L1 weight of a standard SAE.")
    training_tokens: int = option(400_000, "Tokens to train on.")
    batch_size_tokens: int = option(1024, "Tokens per training batch.")
    lr: float = option(1e-3, "Learning rate.")
    seed: int = option(0, "Training seed (training is deterministic given it).")

    def check(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise BadInput(
                f"--architecture {self.architecture}: not one of {', '.join(ARCHITECTURES)}"
            )
        for name in ("expansion", "k", "training_tokens", "batch_size_tokens"):
            if getattr(self, name) < 1:
                raise BadInput(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 1")
        if self.d_sae is not None and self.d_sae < 1:
            raise BadInput(f"--d-sae {self.d_sae}: must be >= 1")
        if self.lr <= 0 or self.l1_coefficient < 0:
            raise BadInput("--lr must be > 0 and --l1-coefficient >= 0")

    def training(self, hook: str) -> "SaeTraining":
        names = SaeTrainOptions.__dataclass_fields__
        return SaeTraining(hook=hook, **{n: getattr(self, n) for n in names})


@dataclass(frozen=True)
class SaeTraining(SaeTrainOptions):
    """One SAE to train: the options and the hook it reads."""

    hook: str = ""

    def params(self) -> dict[str, Any]:
        """The settings that change the result (the run key's part)."""
        out = asdict(self)
        if self.architecture == "topk":
            out.pop("l1_coefficient")
        else:
            out.pop("k")
        return out
