"""Computing a planned `transcoders` run (`workbench.transcoders.plan`): train the set (into a
staging directory of its own, moved to its final directory when the run commits, as trained
SAEs are) or take the loaded one, measure it (`workbench.transcoders.train.measure`), and
return the rows of `transcoder_sets`, of `saes` (one per layer), `features` and
`feature_examples`, and the features' nodes."""

import logging
import shutil
from dataclasses import replace

import pyarrow as pa

from workbench import rows
from workbench.models.base import LoadedModel
from workbench.results import RunResult
from workbench.sae import features
from workbench.sae.compute import feature_tables, staging_dir
from workbench.transcoders.plan import SetRun, layer_sae_id
from workbench.transcoders.sets import TranscoderSet, save_saelens
from workbench.transcoders.train import measure, train_transcoders

logger = logging.getLogger(__name__)


def _trained(loaded: LoadedModel, run: SetRun) -> tuple[TranscoderSet, str]:
    assert run.training is not None
    staging = staging_dir(run.final_dir)
    try:
        tset = train_transcoders(loaded, run.corpus, run.training)
        save_saelens(tset, staging, model_name=loaded.info.model_id)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return replace(tset, source="trained"), str(staging)


def compute_set(loaded: LoadedModel, run: SetRun, *, batch_size: int) -> RunResult:
    files: dict[str, str] = {}
    if run.checked is None:
        tset, staging = _trained(loaded, run)
        files[staging] = str(run.final_dir)
    else:
        tset = run.checked
    held_out_from = 0 if run.training is None else run.training.training_windows(run.corpus)
    quality = measure(
        loaded,
        tset,
        run.corpus,
        top_k=run.top_k_examples,
        batch_size=batch_size,
        quality_from=held_out_from,
    )
    checkpoint_id = loaded.checkpoint.checkpoint_id
    tables: dict[str, list[pa.Table]] = {"saes": [], "features": [], "feature_examples": []}
    nodes = []
    for layer, tc in enumerate(tset.transcoders):
        sae_id = layer_sae_id(run.set_id, layer)
        stats, q = quality.stats[layer], quality.layers[layer]
        sae_row = {
            "sae_id": sae_id,
            "checkpoint_id": checkpoint_id,
            "hook": tset.input_hook(layer),
            "architecture": tc.architecture,
            "d_in": tc.d_in,
            "d_sae": tc.d_transcoder,
            "path": run.location,
            "source": tset.source,
            "corpus": run.corpus.name,
            "n_tokens": q.n_tokens,
            "l0": q.l0,
            "explained_variance": q.explained_variance,
            "mse": q.mse,
            "ce_loss_recovered": None,
            "ce_loss_clean": None,
            "ce_loss_sae": None,
            "ce_loss_zero": None,
            "dead_fraction": q.dead_fraction,
            "hook_out": tset.output_hook(layer),
            "set_id": run.set_id,
            "histogram_edges": features.HISTOGRAM_EDGES,
        }
        effects = features.direction_logit_effects(loaded, tc.W_dec.to(loaded.model.W_U))
        tables["saes"].append(rows.sae_rows(sae_row))
        for name, table in feature_tables(loaded, sae_id, stats, run.corpus, effects).items():
            tables[name].append(table)
        nodes.append(
            rows.feature_node_rows(
                loaded.info.model_id, sae_id, tset.input_hook(layer), layer, tc.d_transcoder
            )
        )
    n = len(quality.layers)
    l0 = sum(q.l0 for q in quality.layers) / n
    ev = sum(q.explained_variance for q in quality.layers) / n
    set_row = {
        "set_id": run.set_id,
        "checkpoint_id": checkpoint_id,
        "source": tset.source,
        "path": run.location,
        "architecture": tset.architecture,
        "n_layers": n,
        "d_transcoder": tset.d_transcoder,
        "hook_in": tset.hook_in,
        "hook_out": tset.hook_out,
        "corpus": run.corpus.name,
        "n_tokens": quality.layers[0].n_tokens,
        "l0": l0,
        "explained_variance": ev,
        "ce_loss_clean": quality.ce_loss_clean,
        "ce_loss_replaced": quality.ce_loss_replaced,
        "ce_loss_zero": quality.ce_loss_zero,
        "ce_loss_recovered": quality.ce_loss_recovered,
    }
    metrics = {"l0": l0, "explained_variance": ev}
    if quality.ce_loss_recovered is not None:
        metrics["ce_loss_recovered"] = quality.ce_loss_recovered
    logger.info(
        "transcoders %s: %d layers, mean L0 %.2f, mean explained variance %.3f, CE recovered %s",
        run.set_id, n, l0, ev, quality.ce_loss_recovered,
    )  # fmt: skip
    combined = {name: pa.concat_tables(parts) for name, parts in tables.items()}
    combined["transcoder_sets"] = pa.Table.from_pylist([set_row])
    return RunResult(metrics=metrics, tables=combined, nodes=pa.concat_tables(nodes), files=files)
