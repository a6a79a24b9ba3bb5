"""Planning a `transcoders` run: the set it trains or loads, its id, where a trained set goes,
and the parameters it is keyed by. No torch at import (the command line reads the pipeline).

A run trains a set (one transcoder per layer) or loads one from a directory (`--transcoders`,
SAELens's or circuit-tracer's format); its set is stored under the id `tc-<first 10 hex digits
of the run key>`, each layer's transcoder under `<set_id>-L<layer>`. A trained set is written in
SAELens's format to `<transcoder root>/<set_id>/` when its run commits.
"""

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench.errors import BadInput
from workbench.hashing import sha256_files
from workbench.jobs import dtype_name, run_key

if TYPE_CHECKING:
    from workbench.models.base import LoadedModel
    from workbench.sae.corpus import Corpus
    from workbench.tasks.spec import Task
    from workbench.transcoders.sets import TranscoderSet
    from workbench.transcoders.train import TranscoderTraining

PIPELINE = "transcoders"
METHOD = "transcoders"


def layer_sae_id(set_id: str, layer: int) -> str:
    """The id (in `saes`, and in feature node ids) of one layer's transcoder of a set."""
    return f"{set_id}-L{layer}"


@dataclass
class SetRun:
    """One planned transcoders run."""

    set_id: str
    root: Path  # a trained set ends up in root / set_id
    corpus: "Corpus"
    top_k_examples: int
    key: dict[str, Any]
    training: "TranscoderTraining | None" = None  # None: loaded
    loaded_from: str | None = None
    checked: "TranscoderSet | None" = None

    @property
    def final_dir(self) -> Path:
        return self.root / self.set_id

    @property
    def location(self) -> str:
        return str(self.final_dir) if self.training is not None else str(self.loaded_from)


def set_files(path: Path) -> list[Path]:
    """The files a set directory's content is keyed by."""
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".yaml", ".json",
                  ".safetensors"))  # fmt: skip


def plan_set(
    loaded: "LoadedModel",
    task: "Task",
    *,
    training: "TranscoderTraining",
    load: str | None,
    corpus: str,
    corpus_tokens: int,
    context_size: int | None,
    top_k_examples: int,
    root: Path,
) -> SetRun:
    """The run; a model without MLPs, a set that does not fit, a bad corpus or option raises
    BadInput here, before anything is computed."""
    from workbench.sae.corpus import load_corpus
    from workbench.transcoders.sets import load_transcoder_set

    model = loaded.model
    if model.cfg.attn_only or model.cfg.d_mlp is None:
        raise BadInput(
            f"transcoders: model {loaded.info.model_id} is attention-only, it has no MLPs"
        )
    checked = None
    source: dict[str, Any]
    if load is not None:
        path = Path(load).expanduser()
        checked = load_transcoder_set(path).fitted_to(model, str(path))
        source = {"load": str(path.resolve()), "sha256": sha256_files(set_files(path))}
    else:
        training.check()
        source = {"train": asdict(training)}
    the_corpus = load_corpus(
        corpus, loaded, task, n_tokens=corpus_tokens, context_size=context_size
    )
    if load is None:
        training.training_windows(the_corpus)  # enough windows to hold some out
    key = {
        "set": source,
        "corpus": the_corpus.name,
        "corpus_sha256": the_corpus.sha256,
        "context_size": the_corpus.context_size,
        "top_k_examples": top_k_examples,
        "dtype": dtype_name(loaded),
        # trained and measured on every window's tokens but its first and BOS (sets stored
        # before this key counted a window's first token too)
        "counted": "not first, not BOS",
    }
    full = run_key(PIPELINE, METHOD, loaded.checkpoint.sha256, task.sha256, key)
    return SetRun(
        f"tc-{full[:10]}",
        root,
        the_corpus,
        top_k_examples,
        key,
        None if load is not None else training,
        load,
        checked,
    )
