"""Transcoder sets: one transcoder per layer of a model, what they compute, and their two
on-disk formats.

A transcoder at layer l reads the MLP's input x (the `hook_in` activation of block l) and
predicts the MLP's output (`hook_out`) through sparse features:

    pre(x)  = x @ W_enc + b_enc                       W_enc [d_in, d_transcoder]
    f(x)    = act(pre(x))                             relu, jumprelu (threshold) or topk (k)
    out(x)  = f(x) @ W_dec + b_dec + x @ W_skip.T     W_dec [d_transcoder, d_out]; W_skip optional

Formats read (`load_transcoder_set`) and written:

* **SAELens** (`save_saelens`): one folder per layer, each a SAELens transcoder (`cfg.json` with
  `architecture` transcoder, skip_transcoder, jumprelu_transcoder or jumprelu_skip_transcoder,
  `metadata.hook_name` and `metadata.hook_name_out`, and `sae_weights.safetensors`), loadable
  with `sae_lens.SAE.load_from_disk`;
* **circuit-tracer's transcoder set** (`save_circuit_tracer`): `config.yaml`
  (`model_kind: transcoder_set`, `feature_input_hook`, `feature_output_hook`, optionally
  `activation`, `k` and `transcoders`, a list of per-layer files) and `layer_{i}.safetensors`
  with `W_enc` [d_transcoder, d_in], `W_dec` [d_transcoder, d_out], `b_enc`, `b_dec` and
  optionally `W_skip` and `activation_function.threshold`. Its hooks name a block's hook
  without the `blocks.{i}.` prefix; circuit-tracer's own `mlp.hook_in` / `mlp.hook_out` (hooks
  it adds around each MLP) are read as `ln2.hook_normalized` / `hook_mlp_out`. circuit-tracer
  runs its models with their norms unfolded, so its sets read the MLP's input after the norm's
  weight and bias (`norm_applied`); the workbench loads models with them folded into the MLP
  (`workbench.models.engine.PROCESSING`), and `TranscoderSet.fitted_to` folds them into the
  set instead. A set written here from one that reads the folded input (every set trained
  here) carries `input_normalisation: folded` in its `config.yaml`, so that it reads back the
  same; circuit-tracer itself ignores that key, so such a set is exact there only for a model
  whose MLP norm weights are 1 and biases 0.
"""

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float

from workbench.errors import BadInput

ACTIVATIONS = ("relu", "jumprelu", "topk")
DEFAULT_HOOK_IN = "ln2.hook_normalized"
DEFAULT_HOOK_OUT = "hook_mlp_out"
# circuit-tracer's hooks around each MLP, and the TransformerLens hooks that carry the same
# activations in a model loaded with its LayerNorm weights folded
CIRCUIT_TRACER_HOOKS = {"mlp.hook_in": "ln2.hook_normalized", "mlp.hook_out": "hook_mlp_out"}
SAELENS_ARCHITECTURES = {
    ("relu", False): "transcoder",
    ("relu", True): "skip_transcoder",
    ("jumprelu", False): "jumprelu_transcoder",
    ("jumprelu", True): "jumprelu_skip_transcoder",
}


@dataclass
class Transcoder:
    """One layer's transcoder, its weights in SAELens's orientation."""

    W_enc: Float[torch.Tensor, "d_in d_tc"]
    b_enc: Float[torch.Tensor, " d_tc"]
    W_dec: Float[torch.Tensor, "d_tc d_out"]
    b_dec: Float[torch.Tensor, " d_out"]
    W_skip: Float[torch.Tensor, "d_out d_in"] | None = None
    threshold: Float[torch.Tensor, " d_tc"] | None = None
    activation: str = "relu"
    k: int | None = None

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_transcoder(self) -> int:
        return int(self.W_enc.shape[1])

    @property
    def d_out(self) -> int:
        return int(self.W_dec.shape[1])

    def pre(self, x: Float[torch.Tensor, "... d_in"]) -> Float[torch.Tensor, "... d_tc"]:
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: Float[torch.Tensor, "... d_tc"]) -> Float[torch.Tensor, "... d_tc"]:
        if self.activation == "jumprelu":
            assert self.threshold is not None
            return torch.relu(pre) * (pre > self.threshold)
        if self.activation == "topk":
            assert self.k is not None
            top = torch.topk(pre, self.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        return torch.relu(pre)

    def encode(self, x: Float[torch.Tensor, "... d_in"]) -> Float[torch.Tensor, "... d_tc"]:
        return self.activate(self.pre(x))

    def decode(self, f: Float[torch.Tensor, "... d_tc"]) -> Float[torch.Tensor, "... d_out"]:
        return f @ self.W_dec + self.b_dec

    def skip(self, x: Float[torch.Tensor, "... d_in"]) -> Float[torch.Tensor, "... d_out"]:
        if self.W_skip is None:
            return torch.zeros((*x.shape[:-1], self.d_out), dtype=x.dtype, device=x.device)
        return x @ self.W_skip.T

    def __call__(self, x: Float[torch.Tensor, "... d_in"]) -> Float[torch.Tensor, "... d_out"]:
        return self.decode(self.encode(x)) + self.skip(x)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        moved: dict[str, Any] = {
            name: None if value is None else value.to(device=device, dtype=dtype)
            for name, value in self.tensors().items()
        }
        return replace(self, **moved)

    def tensors(self) -> dict[str, torch.Tensor | None]:
        return {
            "W_enc": self.W_enc,
            "b_enc": self.b_enc,
            "W_dec": self.W_dec,
            "b_dec": self.b_dec,
            "W_skip": self.W_skip,
            "threshold": self.threshold,
        }

    @property
    def architecture(self) -> str:
        """SAELens's name for this kind (topk transcoders have none there: `topk_transcoder`)."""
        if self.activation == "topk":
            return "topk_skip_transcoder" if self.W_skip is not None else "topk_transcoder"
        return SAELENS_ARCHITECTURES[(self.activation, self.W_skip is not None)]


@dataclass
class TranscoderSet:
    """A transcoder for every layer (index = layer), the hooks they read and write (a block's
    hook without its `blocks.{i}.` prefix), and where the set came from."""

    transcoders: list[Transcoder]
    hook_in: str = DEFAULT_HOOK_IN
    hook_out: str = DEFAULT_HOOK_OUT
    source: str = "trained"
    # the transcoders read the MLP's input after its norm's weight and bias, as a model loaded
    # without folding sees it (circuit-tracer's `mlp.hook_in`); the workbench's models have
    # them folded into the MLP, so `fitted_to` folds them into the encoders and skips instead
    norm_applied: bool = False

    def __len__(self) -> int:
        return len(self.transcoders)

    def __getitem__(self, layer: int) -> Transcoder:
        return self.transcoders[layer]

    def input_hook(self, layer: int) -> str:
        return f"blocks.{layer}.{self.hook_in}"

    def output_hook(self, layer: int) -> str:
        return f"blocks.{layer}.{self.hook_out}"

    @property
    def d_transcoder(self) -> int:
        return self.transcoders[0].d_transcoder

    @property
    def architecture(self) -> str:
        return self.transcoders[0].architecture

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        return replace(self, transcoders=[t.to(device, dtype) for t in self.transcoders])

    def splice_hooks(
        self, output: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]
    ) -> list[tuple[str, Any]]:
        """Forward hooks that replace each layer's MLP output by `output(layer, the MLP's input,
        the MLP's output)`, for `model.run_with_hooks`."""
        inputs: dict[int, torch.Tensor] = {}

        def keep(layer: int) -> Any:
            def fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
                inputs[layer] = act
                return act

            return fn

        def replace(layer: int) -> Any:
            def fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
                return output(layer, inputs[layer], act)

            return fn

        hooks = [(self.input_hook(i), keep(i)) for i in range(len(self))]
        return hooks + [(self.output_hook(i), replace(i)) for i in range(len(self))]

    def fitted_to(self, model: Any, where: str) -> "TranscoderSet":
        """The set checked against `model` (`check_fits`) and made to read what `model`'s
        hooks carry: for a set whose inputs are after the norm's weight w and bias b
        (`norm_applied`), x = w * n + b of the normalised n at `hook_in`, so W_enc becomes
        w[:, None] * W_enc, b_enc gains b @ W_enc, W_skip becomes W_skip * w[None, :] and
        b_dec gains W_skip @ b: the same features and outputs, from n."""
        from workbench.models.engine import mlp_norms

        self.check_fits(model, where)
        if not self.norm_applied:
            return self
        norms = mlp_norms(model)
        if norms is None or len(norms) != len(self):
            raise BadInput(
                f"{where}: the set reads the MLP input after its norm's weights (circuit-tracer's "
                "mlp.hook_in), and this model was loaded without them being kept: load it from "
                "its directory"
            )
        return replace(
            self,
            transcoders=[
                _fold_norm(tc, w, b) for tc, (w, b) in zip(self.transcoders, norms, strict=True)
            ],
            norm_applied=False,
        )

    def check_fits(self, model: Any, where: str) -> None:
        """One sentence if the set cannot stand in for `model`'s MLPs: a transcoder for every
        layer, hooks the model has, and the sizes of its activations there."""
        cfg = model.cfg
        if cfg.attn_only or cfg.d_mlp is None:
            raise BadInput(f"{where}: the model is attention-only, it has no MLPs to transcode")
        if len(self) != cfg.n_layers:
            raise BadInput(
                f"{where}: {len(self)} transcoders for a model of {cfg.n_layers} layers "
                "(one per layer is needed)"
            )
        for layer, tc in enumerate(self.transcoders):
            for hook in (self.input_hook(layer), self.output_hook(layer)):
                if hook not in model.hook_dict:
                    raise BadInput(f"{where}: hook {hook!r} is not a hook of the model")
            for name, size in (("input", tc.d_in), ("output", tc.d_out)):
                if size != cfg.d_model:
                    raise BadInput(
                        f"{where}: layer {layer}'s transcoder has {size}-dimensional {name}s, "
                        f"the model's d_model is {cfg.d_model}"
                    )


def _fold_norm(tc: Transcoder, w: torch.Tensor, b: torch.Tensor | None) -> Transcoder:
    """`tc` reading w * n + b, as a transcoder reading n (see `TranscoderSet.fitted_to`)."""
    w = w.to(tc.W_enc.device, torch.float64)
    b = None if b is None else b.to(tc.W_enc.device, torch.float64)
    dtype = tc.W_enc.dtype
    W_enc, b_enc = tc.W_enc.double(), tc.b_enc.double()
    out = {"W_enc": (w[:, None] * W_enc).to(dtype), "b_enc": b_enc}
    b_dec = tc.b_dec.double()
    if b is not None:
        out["b_enc"] = b_enc + b @ W_enc
    if tc.W_skip is not None:
        W_skip = tc.W_skip.double()
        out["W_skip"] = (W_skip * w[None, :]).to(dtype)
        if b is not None:
            b_dec = b_dec + W_skip @ b
    out["b_enc"] = out["b_enc"].to(dtype)
    return replace(tc, **out, b_dec=b_dec.to(dtype))


# -- reading ----------------------------------------------------------------------------------


def load_transcoder_set(path: Path | str) -> TranscoderSet:
    """A set from a directory in either format (BadInput naming what is wrong otherwise)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise BadInput(f"{path}: no transcoder directory here")
    if (path / "config.yaml").is_file():
        return _load_circuit_tracer(path)
    layers = sorted(p for p in path.iterdir() if (p / "cfg.json").is_file())
    if layers:
        return _load_saelens(path, layers)
    raise BadInput(
        f"{path}: not a transcoder set (expected circuit-tracer's config.yaml, or SAELens "
        "transcoder folders with cfg.json)"
    )


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not file.is_file():
        raise BadInput(f"{file}: file not found")
    try:
        return load_file(str(file), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise BadInput(f"{file}: not a readable safetensors file ({err})") from err


def _transcoder(file: Path, tensors: dict[str, torch.Tensor], **kw: Any) -> Transcoder:
    """A transcoder from tensors in SAELens's orientation, each shape checked."""
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        if name not in tensors:
            raise BadInput(f"{file}: tensor {name!r} is missing")
    tensors = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    d_in, d_tc = tensors["W_enc"].shape if tensors["W_enc"].ndim == 2 else (-1, -1)
    d_out = tensors["b_dec"].shape[0] if tensors["b_dec"].ndim == 1 else -1
    expected = {
        "W_enc": (d_in, d_tc),
        "b_enc": (d_tc,),
        "W_dec": (d_tc, d_out),
        "b_dec": (d_out,),
        "W_skip": (d_out, d_in),
        "threshold": (d_tc,),
    }
    if min(d_in, d_tc, d_out) < 1:
        raise BadInput(f"{file}: W_enc must be a matrix and b_dec a vector")
    for name, shape in expected.items():
        if name in tensors and tuple(tensors[name].shape) != shape:
            raise BadInput(
                f"{file}: tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {shape}"
            )
    return Transcoder(
        tensors["W_enc"],
        tensors["b_enc"],
        tensors["W_dec"],
        tensors["b_dec"],
        tensors.get("W_skip"),
        tensors.get("threshold"),
        **kw,
    )


def _load_circuit_tracer(path: Path) -> TranscoderSet:
    import yaml

    config_file = path / "config.yaml"
    try:
        config = yaml.safe_load(config_file.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise BadInput(f"{config_file}: not valid YAML ({where}{problem})") from err
    if not isinstance(config, dict):
        raise BadInput(f"{config_file}: expected a mapping of settings")
    kind = config.get("model_kind", "transcoder_set")
    if kind != "transcoder_set":
        raise BadInput(f"{config_file}: model_kind {kind!r} is not supported (transcoder_set)")
    hooks = []
    for field in ("feature_input_hook", "feature_output_hook"):
        hook = config.get(field)
        if not isinstance(hook, str) or not hook:
            raise BadInput(f"{config_file}: field {field!r} is missing")
        hooks.append(CIRCUIT_TRACER_HOOKS.get(hook, hook))
    activation = config.get("activation", "relu")
    if activation not in ("relu", "topk"):
        raise BadInput(f"{config_file}: activation {activation!r} is not relu or topk")
    k = config.get("k")
    if activation == "topk" and not (isinstance(k, int) and k > 0):
        raise BadInput(f"{config_file}: activation topk needs a positive integer k")
    files = _circuit_tracer_files(path, config, config_file)
    transcoders = []
    for file in files:
        tensors = _read_tensors(file)
        for name in ("W_enc", "b_enc", "b_dec", "W_dec"):
            if name not in tensors:
                raise BadInput(f"{file}: tensor {name!r} is missing")
        d_tc, d_out = tensors["b_enc"].shape[0], tensors["b_dec"].shape[0]
        if tuple(tensors["W_dec"].shape) == (d_out, d_tc) and d_out != d_tc:
            tensors["W_dec"] = tensors["W_dec"].T  # circuit-tracer 0.1 wrote it output-major
        tensors["W_enc"] = tensors["W_enc"].T.contiguous()
        threshold = tensors.pop("activation_function.threshold", None)
        if threshold is not None:
            tensors["threshold"] = threshold
        act = "jumprelu" if threshold is not None else activation
        transcoders.append(_transcoder(file, tensors, activation=act, k=k))
    # circuit-tracer runs models unfolded: its sets read the MLP input after the norm's weight
    # and bias; a set written here from a set that reads the folded input says so
    applied = config.get("input_normalisation", "applied") != "folded"
    return TranscoderSet(transcoders, hooks[0], hooks[1], str(path.resolve()), applied)


def _circuit_tracer_files(path: Path, config: dict[str, Any], config_file: Path) -> list[Path]:
    listed = config.get("transcoders")
    if listed is not None:
        if not isinstance(listed, list) or not all(isinstance(x, str) for x in listed):
            raise BadInput(f"{config_file}: field 'transcoders' must be a list of file paths")
        if any("://" in x for x in listed):
            raise BadInput(f"{config_file}: only local files are read (no hf:// paths)")
        return [(path / x) if not Path(x).is_absolute() else Path(x) for x in listed]
    found = {}
    for file in path.glob("layer_*.safetensors"):
        match = re.fullmatch(r"layer_(\d+)\.safetensors", file.name)
        if match:
            found[int(match.group(1))] = file
    if not found:
        raise BadInput(f"{path}: no layer_{{i}}.safetensors files")
    missing = sorted(set(range(max(found) + 1)) - set(found))
    if missing:
        raise BadInput(f"{path}: layer_{missing[0]}.safetensors is missing")
    return [found[i] for i in range(len(found))]


def _load_saelens(path: Path, folders: list[Path]) -> TranscoderSet:
    by_layer: dict[int, Transcoder] = {}
    hooks_in, hooks_out = set(), set()
    for folder in folders:
        cfg_file = folder / "cfg.json"
        try:
            cfg = json.loads(cfg_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BadInput(f"{cfg_file}: not valid JSON ({err})") from err
        architecture = cfg.get("architecture") if isinstance(cfg, dict) else None
        kinds = {v: k for k, v in SAELENS_ARCHITECTURES.items()}
        if architecture not in kinds:
            raise BadInput(
                f"{cfg_file}: field 'architecture' is {architecture!r}, not a transcoder "
                f"({', '.join(kinds)})"
            )
        metadata = cfg.get("metadata") or {}
        hook_in, hook_out = metadata.get("hook_name"), metadata.get("hook_name_out")
        layer_in, layer_out = _block(hook_in), _block(hook_out)
        if layer_in is None or layer_out is None or layer_in[0] != layer_out[0]:
            raise BadInput(
                f"{cfg_file}: metadata.hook_name and metadata.hook_name_out must name hooks of "
                f"one block (blocks.<i>.…), not {hook_in!r} and {hook_out!r}"
            )
        layer = layer_in[0]
        if layer in by_layer:
            raise BadInput(f"{path}: two transcoders for layer {layer}")
        hooks_in.add(layer_in[1])
        hooks_out.add(layer_out[1])
        tensors = _read_tensors(folder / "sae_weights.safetensors")
        activation, skip = kinds[architecture]
        if skip and "W_skip" not in tensors:
            raise BadInput(f"{folder}: a {architecture} needs tensor 'W_skip'")
        if activation == "jumprelu" and "threshold" not in tensors:
            raise BadInput(f"{folder}: a {architecture} needs tensor 'threshold'")
        by_layer[layer] = _transcoder(folder, tensors, activation=activation)
    if len(hooks_in) > 1 or len(hooks_out) > 1:
        raise BadInput(f"{path}: the transcoders read or write different hooks of their blocks")
    missing = sorted(set(range(max(by_layer) + 1)) - set(by_layer))
    if missing:
        raise BadInput(f"{path}: no transcoder for layer {missing[0]}")
    ordered = [by_layer[i] for i in range(len(by_layer))]
    return TranscoderSet(ordered, hooks_in.pop(), hooks_out.pop(), str(path.resolve()))


def _block(hook: Any) -> tuple[int, str] | None:
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", hook) if isinstance(hook, str) else None
    return (int(match.group(1)), match.group(2)) if match else None


# -- writing ----------------------------------------------------------------------------------


def save_saelens(tset: TranscoderSet, out: Path, model_name: str | None = None) -> None:
    """Write `tset` in SAELens's format: `out/layer_{i}/` per layer, through SAELens's own
    classes, so that `SAE.load_from_disk` reads each folder back. SAELens's hooks are those of
    a model with its norms folded: a set that reads the input after the norm's weights
    (`norm_applied`) is fitted to its model first."""
    import sae_lens

    if tset.norm_applied:
        raise BadInput(
            f"{tset.source}: the set reads the MLP input after its norm's weights; fit it to "
            "its model (TranscoderSet.fitted_to) before writing it in SAELens's format"
        )

    classes = {
        "transcoder": (sae_lens.Transcoder, sae_lens.TranscoderConfig),
        "skip_transcoder": (sae_lens.SkipTranscoder, sae_lens.SkipTranscoderConfig),
        "jumprelu_transcoder": (sae_lens.JumpReLUTranscoder, sae_lens.JumpReLUTranscoderConfig),
        "jumprelu_skip_transcoder": (
            sae_lens.JumpReLUSkipTranscoder,
            sae_lens.JumpReLUSkipTranscoderConfig,
        ),
    }
    for layer, tc in enumerate(tset.transcoders):
        if tc.architecture not in classes:
            raise BadInput(f"a {tc.architecture} has no SAELens format")
        cls, cfg_cls = classes[tc.architecture]
        cfg = cfg_cls(
            d_in=tc.d_in,
            d_sae=tc.d_transcoder,
            d_out=tc.d_out,
            apply_b_dec_to_input=False,
        )
        cfg.metadata.hook_name = tset.input_hook(layer)
        cfg.metadata.hook_name_out = tset.output_hook(layer)
        if model_name:
            cfg.metadata.model_name = model_name
        module = cls(cfg)
        state = {k: v.detach().cpu().float() for k, v in tc.tensors().items() if v is not None}
        module.load_state_dict(state)
        module.save_model(str(out / f"layer_{layer}"))


def save_circuit_tracer(tset: TranscoderSet, out: Path) -> None:
    """Write `tset` as circuit-tracer's transcoder set (`config.yaml`, `layer_{i}.safetensors`)."""
    import yaml
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {
        "model_kind": "transcoder_set",
        "feature_input_hook": tset.hook_in,
        "feature_output_hook": tset.hook_out,
    }
    if not tset.norm_applied:  # (read back as it is; see TranscoderSet.norm_applied)
        config["input_normalisation"] = "folded"
    first = tset.transcoders[0]
    if first.activation == "topk":
        config.update(activation="topk", k=first.k)
    for layer, tc in enumerate(tset.transcoders):
        tensors = {
            "W_enc": tc.W_enc.T.contiguous(),
            "b_enc": tc.b_enc,
            "W_dec": tc.W_dec,
            "b_dec": tc.b_dec,
        }
        if tc.W_skip is not None:
            tensors["W_skip"] = tc.W_skip
        if tc.threshold is not None:
            tensors["activation_function.threshold"] = tc.threshold
        cpu = {k: v.detach().cpu().float().contiguous() for k, v in tensors.items()}
        save_file(cpu, str(out / f"layer_{layer}.safetensors"))
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
