"""Standard errors over prompts: a score is a mean over prompts of each prompt's own value, so
its standard error comes from the sums of those values and of their squares."""

import torch


class PromptMoments:
    """Sums over prompts of per-prompt values and of their squares (float64), for the standard
    error of their mean: `sqrt(var / n)` with the unbiased variance over the `n` prompts."""

    def __init__(self, shape: tuple[int, ...], device: torch.device | str) -> None:
        self.sum = torch.zeros(shape, dtype=torch.float64, device=device)
        self.squares = torch.zeros(shape, dtype=torch.float64, device=device)

    def add(self, per_prompt: torch.Tensor, index: object = ...) -> None:
        """Add values of shape [batch, *shape] (or of `shape[index]`)."""
        values = per_prompt.double()
        self.sum[index] += values.sum(0)  # type: ignore[index]
        self.squares[index] += values.square().sum(0)  # type: ignore[index]

    def stderr(self, n: int, scale: float = 1.0) -> torch.Tensor | None:
        """Standard error of the mean of `scale` x the values over `n` prompts (None for
        n < 2), float32 on the CPU."""
        if n < 2:
            return None
        var = ((self.squares - self.sum.square() / n) / (n - 1)).clamp_min(0)
        return ((var / n).sqrt() * abs(scale)).float().cpu()
