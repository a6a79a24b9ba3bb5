"""`workbench run tuned-lens`: train a tuned lens (`workbench.prompt.tunedlens`) at each chosen
checkpoint on a corpus, as SAEs are trained: the model's corpus (`--corpus task`: for a zoo model
and its own task, the zoo's training sequences; a `.txt` or JSONL file otherwise), its last
tenth of windows held out to measure each layer's KL divergence from the model's final
distribution, for the tuned lens and for the logit lens (the zero lens).

The lens is written to a staging directory beside its final place (`<database's directory>/lenses`
or `--lens-dir`), and moved there in the same transaction that stores its `tuned_lenses` row and
its `lens_metrics`: a crash leaves neither. Keyed by `lens_id` (a hash of the checkpoint, the
corpus and the training settings): a lens already stored is not trained again unless `force`.
`workbench run prompt` then shows the newest lens of the prompt's checkpoint beside the logit
lens (`prompt_tuned_lens`)."""

import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from workbench.errors import BadInput
from workbench.hashing import sha256_json
from workbench.models import load_checkpoint, resolve_checkpoints
from workbench.models.base import LoadedModel
from workbench.models.sources import select_checkpoints
from workbench.prompt.tunedlens import (
    TunedLens,
    TunedLensConfig,
    lens_kl,
    lens_provenance,
    save_tuned_lens,
    train_tuned_lens,
    tuned_lens_predictions,
)
from workbench.rows import loaded_rows
from workbench.store import Store, default_db_path

if TYPE_CHECKING:
    from workbench.sae.corpus import Corpus

logger = logging.getLogger(__name__)

HELD_OUT = 0.1  # the share of the corpus's windows kept out of training, to measure the lens on


def lens_root(lens_dir: str | None, db: str | None) -> Path:
    return Path(lens_dir) if lens_dir else default_db_path(db).parent / "lenses"


def lens_id(checkpoint_id: str, corpus_sha256: str, config: TunedLensConfig) -> str:
    key = {"checkpoint": checkpoint_id, "corpus": corpus_sha256, "training": config.to_dict()}
    return "tl-" + sha256_json(key)[:12]


def run_tuned_lens(
    model: str,
    *,
    task: str | None = None,
    checkpoint: str = "latest",
    corpus: str = "task",
    corpus_tokens: int = 2**17,
    context_size: int | None = None,
    config: TunedLensConfig | None = None,
    lens_dir: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    db: str | None = None,
    force: bool = False,
) -> list[tuple[str, str]]:
    """[(lens_id, 'done' or 'cached')] per checkpoint."""
    config = config or TunedLensConfig()
    config.check()
    if corpus == "task" and task is None:
        raise BadInput("--corpus task needs --task NAME_OR_JSONL (or give --corpus FILE)")
    if corpus_tokens < 1:
        raise BadInput(f"--corpus-tokens {corpus_tokens}: must be 1 or more")
    refs = select_checkpoints(resolve_checkpoints(model), checkpoint)
    root = lens_root(lens_dir, db)
    done: list[tuple[str, str]] = []
    for ref in tqdm(refs, desc="tuned-lens checkpoints", disable=len(refs) < 2):
        loaded = load_checkpoint(ref, device=device, dtype=dtype)
        the_corpus = _corpus(loaded, corpus, task, corpus_tokens, context_size)
        windows = the_corpus.windows
        checkpoint_id = loaded.checkpoint.checkpoint_id
        lid = lens_id(checkpoint_id, the_corpus.sha256, config)
        if not force:
            with Store(db) as store:
                if store.has_tuned_lens(lid):
                    logger.info("tuned lens %s at %s: stored already", lid, checkpoint_id)
                    done.append((lid, "cached"))
                    continue
        held = max(1, int(len(windows) * HELD_OUT)) if len(windows) > 1 else 0
        train, test = (windows[:-held], windows[-held:]) if held else (windows, windows)
        lens = train_tuned_lens(loaded.model, train, config)
        tuned = lens_kl(loaded.model, lens, test).tolist()
        logit = lens_kl(loaded.model, None, test).tolist()
        final = root / lid
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = final.with_name(f".{lid}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        provenance = lens_provenance(checkpoint_id, the_corpus, config)
        save_tuned_lens(lens, staging, provenance)
        head = {
            "lens_id": lid,
            "model_id": loaded.info.model_id,
            "checkpoint_id": checkpoint_id,
            "path": str(final),
            "params": config.to_dict(),
            "corpus": the_corpus.name,
            "n_tokens": int(train.numel()),
        }
        metrics = [
            {"lens_id": lid, "layer": layer, "metric": metric, "value": value}
            for layer, (t, g) in enumerate(zip(tuned, logit, strict=True))
            for metric, value in (("kl_tuned", t), ("kl_logit_lens", g))
        ]
        with Store(db) as store:
            store.save_tuned_lens(head, metrics, loaded_rows(loaded), staging, final)
        logger.info("tuned lens %s at %s: stored in %s", lid, checkpoint_id, final)
        done.append((lid, "done"))
    return done


def _corpus(
    loaded: LoadedModel, spec: str, task: str | None, n_tokens: int, ctx: int | None
) -> "Corpus":
    """The corpus `--corpus` names (a task's needs `--task`; a file's does not read it)."""
    from workbench.sae.corpus import load_corpus
    from workbench.tasks import load_task

    the_task = load_task(task, loaded) if task is not None else None
    return load_corpus(spec, loaded, the_task, n_tokens=n_tokens, context_size=ctx)  # type: ignore[arg-type]


def lens_rows(
    loaded: LoadedModel, lens: TunedLens, lid: str, pid: str, ids: list[int]
) -> list[dict[str, Any]]:
    """The `prompt_tuned_lens` rows of one prompt: the top 5 tokens at every stream and
    position (`rank` 0–4) and the probability of the model's prediction (`rank` NULL)."""
    found = tuned_lens_predictions(loaded.model, lens, ids)
    named = sorted({tid for _, _, _, tid, _ in found.lens} | {found.predicted_id})
    names = dict(zip(named, loaded.token_strs(named), strict=True))
    rows = [
        {"prompt_id": pid, "lens_id": lid, "layer": layer, "position": pos, "rank": rank,
         "token_id": tid, "token": names[tid], "prob": prob}
        for layer, pos, rank, tid, prob in found.lens
    ]  # fmt: skip
    for layer in range(found.target.shape[0]):
        rows += [
            {"prompt_id": pid, "lens_id": lid, "layer": layer, "position": pos, "rank": None,
             "token_id": found.predicted_id, "token": names[found.predicted_id],
             "prob": float(found.target[layer, pos])}
            for pos in range(found.target.shape[1])
        ]  # fmt: skip
    return rows
