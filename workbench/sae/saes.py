"""Sparse autoencoders on a model's hooks: where they read, how they are loaded and checked.

SAEs are SAELens `SAE` objects. The workbench always hands them flat activations
`[..., d_in]`: a `hook_z` activation `[..., n_heads, d_head]` is flattened to `n_heads * d_head`
first (Kissane et al. 2024), so SAELens's own hook_z reshaping is switched off.

`--sae` takes a directory in SAELens's disk format (`cfg.json` + `sae_weights.safetensors`, as
written by `SAE.save_model` or SAELens's training runner) or `pretrained:<release>/<sae_id>`, a
SAELens pretrained release (downloaded from the Hugging Face hub, so it needs a connection or a
warm local cache). An SAE whose hook is not in the model, or whose input size differs from the
hook's activation size, is rejected in one sentence before anything is computed.
"""

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int

from workbench.attribution.batches import model_device
from workbench.core import Hook
from workbench.errors import BadInput
from workbench.models.base import LoadedModel
from workbench.sae.options import PRETRAINED_PREFIX

logger = logging.getLogger(__name__)


@dataclass
class LoadedSae:
    """An SAE ready for one model: the SAELens object and what the store records about it."""

    sae: Any  # sae_lens.SAE
    hook: str
    architecture: str
    source: str  # "trained", a directory, or "pretrained:<release>/<sae_id>"
    path: str | None = None

    @property
    def d_in(self) -> int:
        return int(self.sae.cfg.d_in)

    @property
    def d_sae(self) -> int:
        return int(self.sae.cfg.d_sae)

    @property
    def dtype(self) -> torch.dtype:
        return self.sae.W_dec.dtype

    def encode(self, x: Float[torch.Tensor, "... d_in"]) -> Float[torch.Tensor, "... d_sae"]:
        """Features of `x`, computed in the SAE's own precision (float32) whatever the model's."""
        return self.sae.encode(x.to(self.dtype))

    def decode(self, f: Float[torch.Tensor, "... d_sae"]) -> Float[torch.Tensor, "... d_in"]:
        return self.sae.decode(f)


def activation_size(loaded: LoadedModel, hook: str) -> int:
    """The flat size of the activation at `hook` (BadInput when the model has no such hook)."""
    model = loaded.model
    if hook not in model.hook_dict:
        raise BadInput(
            f"hook {hook!r} is not a hook of model {loaded.info.model_id} "
            "(e.g. blocks.0.hook_resid_post, blocks.0.attn.hook_z, blocks.0.hook_mlp_out)"
        )
    tokens = torch.zeros((1, 2), dtype=torch.long, device=model_device(model))
    with torch.no_grad():
        _, cache = model.run_with_cache(
            tokens, names_filter=[hook], stop_at_layer=Hook.stop_layer(hook)
        )
    return int(cache[hook][0, 0].numel())


@torch.no_grad()
def hook_activations(
    loaded: LoadedModel, hook: str, tokens: Int[torch.Tensor, "batch pos"]
) -> Float[torch.Tensor, "batch pos d_in"]:
    """Activations at `hook`, flattened to `d_in`; the forward pass stops after the hook."""
    _, cache = loaded.model.run_with_cache(
        tokens.to(model_device(loaded.model)),
        names_filter=[hook],
        stop_at_layer=Hook.stop_layer(hook),
    )
    act = cache[hook]
    return act.reshape(act.shape[0], act.shape[1], -1)


def check_fits(sae: LoadedSae, loaded: LoadedModel, where: str) -> None:
    """One sentence if the SAE cannot read this model's activations."""
    size = activation_size(loaded, sae.hook)
    if sae.d_in != size:
        raise BadInput(
            f"{where}: the SAE reads {sae.d_in}-dimensional inputs at {sae.hook}, but model "
            f"{loaded.info.model_id} has {size} there"
        )
    head_index = getattr(sae.sae.cfg.metadata, "hook_head_index", None)
    if head_index is not None:
        raise BadInput(f"{where}: SAEs on a single head (hook_head_index) are not supported")


def prepare(sae: Any, device: torch.device | str = "cpu") -> Any:
    """Evaluation mode on `device` (the model's), flat hook_z inputs, no gradients into the
    SAE's weights."""
    sae = sae.to(device)
    sae.eval()
    if getattr(sae, "hook_z_reshaping_mode", False):
        sae.turn_off_forward_pass_hook_z_reshaping()
    for param in sae.parameters():
        param.requires_grad_(False)
    return sae


def load_sae(spec: str, loaded: LoadedModel) -> LoadedSae:
    """An SAE from a SAELens directory or a pretrained release, checked against the model."""
    if spec.startswith(PRETRAINED_PREFIX):
        result = _load_pretrained(spec[len(PRETRAINED_PREFIX) :], spec)
    else:
        result = _load_directory(Path(spec).expanduser())
    check_fits(result, loaded, spec)
    result.sae = result.sae.to(model_device(loaded.model))
    return result


def _load_directory(path: Path) -> LoadedSae:
    from sae_lens import SAE

    if not path.is_dir():
        raise BadInput(
            f"{path}: no SAE directory here (give a SAELens SAE directory or "
            "pretrained:<release>/<sae_id>)"
        )
    for name in ("cfg.json", "sae_weights.safetensors"):
        if not (path / name).is_file():
            raise BadInput(f"{path}: not a SAELens SAE directory (no {name})")
    try:
        sae = SAE.load_from_disk(str(path), device="cpu")
    except (KeyError, ValueError, TypeError, RuntimeError, OSError) as err:
        raise BadInput(f"{path}: cannot load the SAE ({type(err).__name__}: {err})") from err
    hook = sae.cfg.metadata.hook_name
    if not hook:
        raise BadInput(f"{path}/cfg.json: field 'metadata.hook_name' is missing")
    architecture = sae.cfg.architecture()
    return LoadedSae(prepare(sae), str(hook), architecture, str(path.resolve()), str(path))


def _load_pretrained(name: str, spec: str) -> LoadedSae:
    from sae_lens import SAE
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    from workbench.models.engine import hub_offline

    release, _, sae_id = name.partition("/")
    if not release or not sae_id:
        raise BadInput(f"{spec}: expected pretrained:<release>/<sae_id>")
    directory = get_pretrained_saes_directory()
    if release not in directory:
        raise BadInput(f"{spec}: {release!r} is not a SAELens pretrained release")
    if sae_id not in directory[release].saes_map:
        raise BadInput(f"{spec}: release {release!r} has no SAE {sae_id!r}")
    try:
        sae = SAE.from_pretrained(release, sae_id, device="cpu")
    except Exception as err:  # hub errors come in many types; all mean "not available here"
        reason = "the hub is offline (HF_HUB_OFFLINE=1)" if hub_offline() else str(err)
        first = reason.splitlines()[0] if reason else type(err).__name__
        raise BadInput(
            f"{spec}: not in the local Hugging Face cache and could not be downloaded: {first}"
        ) from err
    hook = sae.cfg.metadata.hook_name
    if not hook:
        raise BadInput(f"{spec}: the SAE's config names no hook (metadata.hook_name)")
    return LoadedSae(prepare(sae), str(hook), sae.cfg.architecture(), spec, None)
