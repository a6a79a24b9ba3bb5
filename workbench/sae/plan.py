"""Planning the SAE runs: which SAEs an invocation trains or loads, their ids, where trained ones
go, and the parameters each run is keyed by.

A `sae_features` run is planned per SAE source (a hook to train at, or an SAE to load); its SAE
is stored under the id `sae-<first 10 hex digits of the run's key>`, so the same SAE trained or
loaded again on the same checkpoint, task and corpus gets the same id. A trained SAE's final
directory is `<sae root>/<sae_id>` (`workbench.sae.compute` trains it into a staging directory
beside it). A `sae_attr` run reads the SAEs of its invocation, or the ones stored for the
checkpoint.

Planning checks every source (the hook exists, a loaded SAE fits the model, the training
options are valid) and loads the corpus, so bad input fails before any run is computed. No
torch at import: the command line reads the pipeline that uses this module.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench.hashing import sha256_files
from workbench.jobs import dtype_name, run_key
from workbench.sae.options import PRETRAINED_PREFIX, SaeTraining, SaeTrainOptions

if TYPE_CHECKING:
    from workbench.models.base import LoadedModel
    from workbench.sae.corpus import Corpus
    from workbench.sae.saes import LoadedSae
    from workbench.tasks.spec import Task

PIPELINE = "sae"
FEATURES_METHOD = "sae_features"


@dataclass(frozen=True)
class SaeSource:
    """Where an SAE of an invocation comes from: trained at a hook, or loaded from `spec`."""

    kind: str  # "train" | "load"
    spec: str

    def key(self, options: SaeTrainOptions) -> dict[str, Any]:
        """The source's part of the run key: the training settings, or what is loaded (a
        directory with the sha256 of its files, or a pretrained spec)."""
        if self.kind == "train":
            return {"train": options.training(self.spec).params()}
        if self.spec.startswith(PRETRAINED_PREFIX):
            return {"load": self.spec}
        path = Path(self.spec).expanduser()
        files = [path / "cfg.json", path / "sae_weights.safetensors"]
        return {"load": str(path.resolve()), "sha256": sha256_files(files)}


def sources(hooks: list[str], saes: list[str]) -> list[SaeSource]:
    """The SAEs to train (one per hook), then those to load, in the order given."""
    return [SaeSource("train", h) for h in hooks] + [SaeSource("load", s) for s in saes]


@dataclass
class FeaturesRun:
    """One planned sae_features run: what computing it needs besides the model."""

    source: SaeSource
    sae_id: str
    sae_root: Path  # a trained SAE ends up in sae_root / sae_id
    corpus: "Corpus"
    top_k_examples: int
    key: dict[str, Any]  # the run's keyed parameters
    training: SaeTraining | None = None  # what to train (None: the source is loaded)
    checked: "LoadedSae | None" = None  # the SAE as loaded and checked while planning

    @property
    def final_dir(self) -> Path:
        return self.sae_root / self.sae_id

    @property
    def location(self) -> str:
        """Where the SAE is read from once its run is stored: its final directory when
        trained, else the directory or pretrained spec it was loaded from."""
        return str(self.final_dir) if self.source.kind == "train" else self.source.spec


def plan_features(
    loaded: "LoadedModel",
    task: "Task",
    planned_sources: list[SaeSource],
    options: SaeTrainOptions,
    *,
    corpus: str,
    corpus_tokens: int,
    context_size: int | None,
    top_k_examples: int,
    sae_root: Path,
) -> list[FeaturesRun]:
    """One run per source; a bad hook, SAE, corpus or option raises BadInput here."""
    from workbench.sae.corpus import load_corpus
    from workbench.sae.saes import activation_size, load_sae

    if not planned_sources:
        return []
    loaded_corpus = load_corpus(
        corpus, loaded, task, n_tokens=corpus_tokens, context_size=context_size
    )
    dtype = dtype_name(loaded)
    runs = []
    for source in planned_sources:
        checked = training = None
        if source.kind == "train":
            activation_size(loaded, source.spec)
            options.check()
            training = options.training(source.spec)
        else:
            checked = load_sae(source.spec, loaded)
        key = {
            "sae": source.key(options),
            "corpus": loaded_corpus.name,
            "corpus_sha256": loaded_corpus.sha256,
            "context_size": loaded_corpus.context_size,
            "top_k_examples": top_k_examples,
            "dtype": dtype,  # the run key (and so the SAE id) of another dtype differs
        }
        sae_id = features_sae_id(loaded, task, key)
        runs.append(
            FeaturesRun(
                source, sae_id, sae_root, loaded_corpus, top_k_examples, key, training, checked
            )
        )
    return runs


def features_sae_id(loaded: "LoadedModel", task: "Task", key: dict[str, Any]) -> str:
    """The id of the SAE of the sae_features run keyed by `key` on this checkpoint and task."""
    full_key = run_key(PIPELINE, FEATURES_METHOD, loaded.checkpoint.sha256, task.sha256, key)
    return f"sae-{full_key[:10]}"


@dataclass
class AttrRun:
    """One planned sae_attr run: the SAEs it splices in and its settings."""

    saes: list[tuple[str, str]]  # (sae_id, directory or pretrained spec)
    n_nodes: int
    ig_steps: int
    ig_rule: str
    faithful_target: float
    spot_checks: int = 0

    @property
    def circuit_rule(self) -> str:
        return f"smallest top-n nodes with faithfulness >= {self.faithful_target}"

    @property
    def key(self) -> dict[str, Any]:
        """The run's keyed parameters."""
        return {
            "saes": [sae_id for sae_id, _ in self.saes],
            "n_nodes": self.n_nodes,
            "ig_steps": self.ig_steps,
            "ig_rule": self.ig_rule,
            "circuit": self.circuit_rule,
        } | ({"spot_checks": self.spot_checks} if self.spot_checks else {})
