"""The `sae` pipeline: train or load sparse autoencoders, store their quality, features and top
examples (`sae_features`), and attribute a task to their features (`sae_attr`, feature circuits).

    workbench run sae --model data/zoo/induction --task induction --hook blocks.0.hook_resid_post
    workbench run sae --model gpt2 --task ioi.jsonl \
        --sae pretrained:gpt2-small-res-jb/blocks.8.hook_resid_pre
    workbench run sae --model my-model --task t.jsonl --sae path/to/sae_dir --corpus corpus.jsonl

`sae_features` makes one run per SAE (one per `--hook` trained, one per `--sae` loaded); its
SAE is stored under the id `sae-<first 10 hex digits of the run key>`, and a trained SAE is
written in SAELens's format to `<db directory>/saes/<sae_id>/`. `sae_attr` makes one run over
all the SAEs of the invocation (or, without `--hook`/`--sae`, every SAE stored for the
checkpoint) and stores node scores, edges, a faithfulness curve and the smallest faithful
feature circuit.
"""

import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipelines.common import (
    MethodResult,
    PipelineConfig,
    RunOutcome,
    RunSpec,
    link_circuit,
    pipeline_main,
    run_configured,
    run_key,
)
from workbench import records
from workbench.attribution.ig import DEFAULT_IG_RULE, check_ig_rule
from workbench.core import Hook
from workbench.errors import BadInput
from workbench.hashing import sha256_files
from workbench.models import LoadedModel
from workbench.sae.corpus import Corpus, load_corpus
from workbench.sae.saes import PRETRAINED_PREFIX, LoadedSae, activation_size, load_sae
from workbench.sae.train import SaeTrainConfig
from workbench.store import Store
from workbench.store.db import default_db_path
from workbench.tasks import Task

logger = logging.getLogger(__name__)

METHODS = ("sae_features", "sae_attr")


@dataclass
class SaeConfig(PipelineConfig):
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    hooks: list[str] = field(default_factory=list)  # train one SAE per hook
    saes: list[str] = field(default_factory=list)  # load these (directories or pretrained:...)
    architecture: str = "topk"
    expansion: int = 4
    d_sae: int | None = None
    k: int = 8
    l1_coefficient: float = 1.0
    training_tokens: int = 400_000
    lr: float = 1e-3
    seed: int = 0
    corpus: str = "task"
    corpus_tokens: int = 100_000  # tokens of the extraction corpus (training cycles through it)
    context_size: int | None = None
    top_k_examples: int = 10
    n_nodes: int = 16  # nodes per SAE kept for edges in sae_attr
    ig_steps: int = 5  # integrated-gradient steps for sae_attr's node scores (0: plain AtP)
    ig_rule: str = DEFAULT_IG_RULE  # Riemann rule of those steps (workbench.attribution.ig)
    faithful_target: float = 0.8
    sae_dir: str | None = None  # where trained SAEs are written (default <db dir>/saes)

    def train_config(self, hook: str) -> SaeTrainConfig:
        return SaeTrainConfig(
            hook=hook,
            architecture=self.architecture,
            expansion=self.expansion,
            d_sae=self.d_sae,
            l1_coefficient=self.l1_coefficient,
            k=self.k,
            training_tokens=self.training_tokens,
            lr=self.lr,
            seed=self.seed,
        )

    @property
    def sae_root(self) -> Path:
        return Path(self.sae_dir) if self.sae_dir else default_db_path(self.db).parent / "saes"


@dataclass(frozen=True)
class SaeSource:
    """Where an SAE of this invocation comes from: trained at a hook, or loaded from `spec`."""

    kind: str  # "train" | "load"
    spec: str

    def params(self, cfg: SaeConfig) -> dict[str, Any]:
        if self.kind == "train":
            return {"train": cfg.train_config(self.spec).params()}
        if self.spec.startswith(PRETRAINED_PREFIX):
            return {"load": self.spec}
        path = Path(self.spec).expanduser()
        files = [path / "cfg.json", path / "sae_weights.safetensors"]
        return {"load": str(path.resolve()), "sha256": sha256_files(files)}


def features_params(source: SaeSource, cfg: SaeConfig, corpus: Corpus) -> dict[str, Any]:
    return {
        "sae": source.params(cfg),
        "corpus": corpus.name,
        "corpus_sha256": corpus.sha256,
        "context_size": corpus.context_size,
        "top_k_examples": cfg.top_k_examples,
        "dtype": cfg.dtype,  # the run key (and so the SAE id) of a run in another dtype differs
    }


def compute_features(
    source: SaeSource,
    sae_id: str,
    corpus: Corpus,
    cfg: SaeConfig,
    loaded: LoadedModel,
    task: Task,
    *,
    checked: LoadedSae | None = None,
) -> MethodResult:
    """`checked`: the SAE as loaded and checked while planning, so it is not loaded again."""
    from workbench.sae import features

    sae = checked or obtain_sae(source, sae_id, corpus, cfg, loaded)
    stats = features.scan(loaded, sae, corpus, top_k=cfg.top_k_examples, batch_size=cfg.max_batch)
    quality = features.quality(loaded, sae, corpus, stats)
    effects = features.logit_effects(loaded, sae)
    density = stats.density
    dead = (stats.counts == 0).tolist()
    dense = (density > features.DENSE_DENSITY).tolist()
    n_bins = len(features.HISTOGRAM_EDGES) - 1
    histograms = stats.histogram.reshape(sae.d_sae, n_bins).tolist()
    logits = None
    if effects is not None:
        logits = [
            ([_logit(loaded, t, v) for t, v in top], [_logit(loaded, t, v) for t, v in bottom])
            for top, bottom in effects
        ]
    sae_row = {
        "sae_id": sae_id,
        "checkpoint_id": loaded.checkpoint.checkpoint_id,
        "hook": sae.hook,
        "architecture": sae.architecture,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "path": sae.path,
        "source": sae.source,
        "corpus": corpus.name,
        "n_tokens": stats.n_tokens,
        "l0": quality.l0,
        "explained_variance": quality.explained_variance,
        "mse": quality.mse,
        "ce_loss_recovered": quality.ce_loss_recovered,
        "ce_loss_clean": quality.ce_loss_clean,
        "ce_loss_sae": quality.ce_loss_sae,
        "ce_loss_zero": quality.ce_loss_zero,
        "dead_fraction": sum(dead) / len(dead),
        "histogram_edges": features.HISTOGRAM_EDGES,
    }
    examples = stats.examples()
    windows = [corpus.windows[e[2]].tolist() for e in examples]
    rows = {
        "saes": records.sae_rows(sae_row),
        "features": records.feature_rows(
            sae_id,
            density.tolist(),
            stats.maxima.tolist(),
            stats.mean_when_active.tolist(),
            dead,
            dense,
            histograms,
            logits,
        ),
        "feature_examples": records.feature_example_rows(
            sae_id,
            [(e[0], e[1], e[3], e[4]) for e in examples],
            windows,
            [loaded.token_strs(w) for w in windows],
            corpus.name,
        ),
        "run_metrics": records.metric_rows(
            {
                "l0": quality.l0,
                "explained_variance": quality.explained_variance,
                **(
                    {"ce_loss_recovered": quality.ce_loss_recovered}
                    if quality.ce_loss_recovered is not None
                    else {}
                ),
            }
        ),
    }
    logger.info(
        "SAE %s at %s: L0 %.2f, explained variance %.3f, CE recovered %s, %d dead",
        sae_id,
        sae.hook,
        quality.l0,
        quality.explained_variance,
        quality.ce_loss_recovered,
        sum(dead),
    )
    return MethodResult(None, None, rows, registry={"nodes": feature_nodes(loaded, sae, sae_id)})


def _logit(loaded: LoadedModel, token: int, value: float) -> dict[str, Any]:
    return {"token": loaded.token_strs([token])[0], "id": token, "value": round(value, 5)}


def feature_nodes(loaded: LoadedModel, sae: LoadedSae, sae_id: str) -> pa.Table:
    return records.feature_node_rows(
        loaded.info.model_id, sae_id, sae.hook, Hook.layer(sae.hook), sae.d_sae
    )


def obtain_sae(
    source: SaeSource, sae_id: str, corpus: Corpus, cfg: SaeConfig, loaded: LoadedModel
) -> LoadedSae:
    """Train (written to `<sae_root>/<sae_id>`, replacing an older copy) or load."""
    if source.kind == "load":
        return load_sae(source.spec, loaded)
    from workbench.sae.train import train_sae

    final = cfg.sae_root / sae_id
    staging = cfg.sae_root / f".{sae_id}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.parent.mkdir(parents=True, exist_ok=True)
    train_sae(loaded, corpus, cfg.train_config(source.spec), staging)
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    sae = load_sae(str(final), loaded)
    sae.source = "trained"
    return sae


def compute_attr(
    sources: list[tuple[str, str]], cfg: SaeConfig, loaded: LoadedModel, task: Task
) -> MethodResult:
    """`sources`: (sae_id, directory or pretrained spec) of each SAE to splice in."""
    from workbench import circuits
    from workbench.attribution.batches import make_batches, model_device
    from workbench.sae import attribution

    saes = [load_sae(spec, loaded) for _, spec in sources]
    sae_ids = [sae_id for sae_id, _ in sources]
    batches = make_batches(task, max_batch=cfg.max_batch, device=model_device(loaded.model))
    spliced = attribution.SplicedModel(loaded.model, saes, sae_ids, batches)
    attr, curve, kept, faith = attribution.feature_circuit(
        spliced,
        ig_steps=cfg.ig_steps,
        ig_rule=cfg.ig_rule,
        n_nodes=cfg.n_nodes,
        target=cfg.faithful_target,
    )
    size = len(kept)
    circuit = circuits.on_input_to_logits_paths(attribution.circuit_edges(attr, kept))
    node_ids = list(attr.node_scores)
    rows = {
        "node_scores": records.node_score_rows(node_ids, [attr.node_scores[n] for n in node_ids]),
        "edges": records.edge_rows(attr.edges + attr.head_edges),
        "faithfulness_curves": records.curve_rows(curve),
        "run_metrics": records.metric_rows(
            {"circuit_nodes": float(size), "error_nodes_in_circuit": float(_errors(kept))}
            | {f"ig_completeness:{sid}": value for sid, value in attr.completeness.items()}
        ),
    }
    linked = link_circuit(
        f"sae_attr: smallest top-n nodes with faithfulness >= {cfg.faithful_target}",
        f"nodes:{size}",
        circuit,
        faith,
    )

    nodes = pa.concat_tables(
        [
            feature_nodes(loaded, s, sid)
            for s, sid in zip(spliced.saes, spliced.sae_ids, strict=True)
        ]
    )
    return MethodResult(
        attr.metric_clean, attr.metric_corrupt, rows, linked, registry={"nodes": nodes}
    )


def _errors(nodes: set[str]) -> int:
    return sum(1 for n in nodes if n.endswith(":err"))


def stored_saes(db: str | None, checkpoint_id: str) -> list[tuple[str, str]]:
    """(sae_id, path or pretrained spec) of the SAEs stored for a checkpoint, newest per hook."""
    with Store(db) as store:
        table = store.query(
            """SELECT sae_id, coalesce(path, source) AS spec FROM (
                 SELECT s.*, row_number() OVER (PARTITION BY s.hook ORDER BY r.finished_at DESC)
                   AS newest
                 FROM saes s JOIN runs r USING (run_id)
                 WHERE s.checkpoint_id = ? AND r.status = 'done')
               WHERE newest = 1 ORDER BY hook""",
            [checkpoint_id],
        )
    ids, specs = table.column("sae_id").to_pylist(), table.column("spec").to_pylist()
    return list(zip(ids, specs, strict=True))


def plan(cfg: SaeConfig, loaded: LoadedModel, task: Task) -> Iterator[RunSpec]:
    sources = [SaeSource("train", h) for h in cfg.hooks] + [SaeSource("load", s) for s in cfg.saes]
    corpus = None
    if sources:
        corpus = load_corpus(
            cfg.corpus, loaded, task, n_tokens=cfg.corpus_tokens, context_size=cfg.context_size
        )
    planned: list[tuple[SaeSource, dict[str, Any], str, Corpus, LoadedSae | None]] = []
    for source in sources:  # bad hooks and SAEs fail here, before anything is written
        checked = None
        if source.kind == "train":
            activation_size(loaded, source.spec)
            cfg.train_config(source.spec).check()
        else:
            checked = load_sae(source.spec, loaded)
        assert corpus is not None
        params = features_params(source, cfg, corpus)
        key = run_key("sae", "sae_features", loaded.checkpoint.sha256, task.sha256, params)
        planned.append((source, params, f"sae-{key[:10]}", corpus, checked))
    if "sae_features" in cfg.methods:
        for source, params, sae_id, source_corpus, checked in planned:
            compute = partial(compute_features, source, sae_id, source_corpus, cfg, checked=checked)
            yield RunSpec("sae_features", params, compute)
    if "sae_attr" in cfg.methods:
        chosen = [
            (sae_id, str(cfg.sae_root / sae_id) if src.kind == "train" else src.spec)
            for src, _, sae_id, _, _ in planned
        ]
        if not sources:
            chosen = stored_saes(cfg.db, loaded.checkpoint.checkpoint_id)
            if not chosen:
                raise BadInput(
                    f"sae_attr: no SAEs stored for {loaded.checkpoint.checkpoint_id}; give --hook "
                    "or --sae"
                )
        params = {
            "saes": [sae_id for sae_id, _ in chosen],
            "n_nodes": cfg.n_nodes,
            "ig_steps": cfg.ig_steps,
            "ig_rule": cfg.ig_rule,
            "circuit": f"smallest top-n nodes with faithfulness >= {cfg.faithful_target}",
        }
        yield RunSpec("sae_attr", params, partial(compute_attr, chosen, cfg))


def run(cfg: SaeConfig) -> list[RunOutcome]:
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise BadInput(f"--method {unknown[0]}: not an sae method ({', '.join(METHODS)})")
    if "sae_features" in cfg.methods and not (cfg.hooks or cfg.saes):
        raise BadInput("the sae pipeline needs --hook (train an SAE there) or --sae (load one)")
    check_ig_rule(cfg.ig_rule)
    return run_configured("sae", cfg, partial(plan, cfg))


def main(argv: list[str] | None = None) -> None:
    pipeline_main("sae", argv)


if __name__ == "__main__":
    main()
