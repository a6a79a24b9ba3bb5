"""The `workbench` command line (docs/cli.md, "Command line").

Exit status: 0 done, 1 a run failed (recorded in `runs`), 2 bad usage or bad input. Errors are
one sentence naming the bad thing, never a traceback.
"""

import atexit
import contextlib
import dataclasses
import gc
import inspect
import logging
import os
import subprocess
import sys
import threading
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import click
import typer
from typer._click.exceptions import UsageError
from typer.core import TyperGroup

from workbench.core import DEFAULT_BATCH_TOKENS
from workbench.errors import BadInput

logger = logging.getLogger("workbench")

app = typer.Typer(
    help="Circuit Workbench: find circuits in transformer language models and query them in SQL.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
export_app = typer.Typer(help="Export stored results.", no_args_is_help=True)
zoo_app = typer.Typer(
    help="Train the zoo's small models with known circuits.", no_args_is_help=True
)
model_app = typer.Typer(help="Bring models into a form the workbench loads.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")
app.add_typer(model_app, name="model")
app.add_typer(export_app, name="export")
import_app = typer.Typer(help="Import results made elsewhere.", no_args_is_help=True)
app.add_typer(import_app, name="import")

DEFAULT_ZOO = Path("data") / "zoo"

DbOption = Annotated[
    str | None,
    typer.Option("--db", help="DuckDB file (default: $WORKBENCH_DB or data/workbench.duckdb)."),
]

# the options of the commands that take one prompt (run prompt, run graph, intervene)
ModelOption = Annotated[str, typer.Option(help="A model directory, run directory or TL name.")]
TextOption = Annotated[str | None, typer.Option(help="The prompt, as text.")]
TaskOption = Annotated[
    str | None, typer.Option(help="A task (built-in name or JSONL) to take a prompt from.")
]
IndexOption = Annotated[int, typer.Option(help="Which of the task's prompts (from 0).")]
CheckpointOption = Annotated[str, typer.Option(help="all, latest or a step number.")]
DeviceOption = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")]
DtypeOption = Annotated[str, typer.Option(help="float32, bfloat16 or float16.")]
ForceOption = Annotated[bool, typer.Option(help="Compute again even if stored.")]
# how the commands that evaluate stored circuits (cross-recovery, seeds) run the task
NPromptsOption = Annotated[int | None, typer.Option(help="Prompts for a built-in task.")]
MaxBatchOption = Annotated[int, typer.Option(help="Prompts per batch.")]
BatchTokensOption = Annotated[
    int | None, typer.Option(help="And at most this many tokens per batch.")
]
MetricOption = Annotated[str | None, typer.Option(help="The metric (default: the task's own).")]


class GraphFormat(StrEnum):
    graphml = "graphml"
    json = "json"


class OutputFormat(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"


@zoo_app.command("train")
def zoo_train(
    task: Annotated[str, typer.Argument(help="Zoo task: induction or ioi.")],
    out: Annotated[
        Path, typer.Option(help="Output directory; checkpoints go to OUT/TASK/step_N.")
    ] = DEFAULT_ZOO,
    steps: Annotated[int, typer.Option(help="Training steps.")] = 1000,
    save_every: Annotated[int, typer.Option(help="Save a checkpoint every K steps.")] = 100,
    seed: Annotated[
        int, typer.Option(help="Random seed (training is deterministic given it).")
    ] = 0,
    device: Annotated[str, typer.Option(help="cpu (default), auto, cuda, cuda:N or mps.")] = "cpu",
    dtype: DtypeOption = "float32",
) -> None:
    """Train a zoo model, saving checkpoints along the way."""
    from workbench.zoo import TrainConfig, train_zoo_model

    cfg = TrainConfig(task=task, out=str(out), steps=steps, save_every=save_every, seed=seed)
    cfg.device, cfg.dtype = device, dtype
    written = train_zoo_model(cfg)
    typer.echo(f"wrote {len(written)} checkpoints to {out / task}")


@model_app.command("import")
def model_import(
    file: Annotated[Path, typer.Argument(help="A GGUF file (llama, mistral, qwen2, qwen3, ...).")],
    out: Annotated[Path, typer.Option("--out", help="The Hugging Face directory to write.")],
) -> None:
    """Dequantise a GGUF file into a float32 Hugging Face directory with its tokenizer."""
    from workbench.models.gguf_import import import_gguf

    written = import_gguf(file, out)
    typer.echo(f"wrote {written} (load it with --model {written})")


class RunGroup(TyperGroup):
    """`workbench run PIPELINE`: a missing or unknown pipeline is a usage error naming the
    pipelines there are."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if not args:
            raise UsageError("Missing argument 'pipeline'.", ctx)
        return super().parse_args(ctx, args)

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        name = args[0] if args else None
        if name and not name.startswith("-") and self.get_command(ctx, name) is None:
            known = ", ".join(self.list_commands(ctx))
            raise UsageError(f"Invalid value for 'PIPELINE': {name!r} is not one of {known}.", ctx)
        return super().resolve_command(ctx, args)


run_app = typer.Typer(
    cls=RunGroup,
    help="Run a pipeline over checkpoints and store the results: workbench run PIPELINE --model "
    "PATH_OR_NAME --task NAME_OR_JSONL [--checkpoint all|latest|STEP] [--method M]... "
    "(`workbench run PIPELINE --help` lists that pipeline's options).",
    no_args_is_help=False,
)
app.add_typer(run_app, name="run")

COMMON_OPTIONS: list[tuple[str, Any, Any]] = [
    (
        "model",
        str,
        typer.Option(..., "--model", help="Checkpoint dir, dir of checkpoints, or model name."),
    ),
    ("task", str, typer.Option(..., "--task", help="Built-in task name or a JSONL task file.")),
    ("checkpoint", str, typer.Option("latest", help="all, latest or a step number.")),
    (
        "method",
        list[str] | None,
        typer.Option(None, "--method", help="Method(s) to run (default: the pipeline's defaults)."),
    ),
    (
        "db",
        str | None,
        typer.Option(
            None, "--db", help="DuckDB file (default: $WORKBENCH_DB or data/workbench.duckdb)."
        ),
    ),
    (
        "force",
        bool,
        typer.Option(False, "--force", help="Re-run even if an identical run is stored."),
    ),
    ("n_prompts", int | None, typer.Option(None, help="Prompts for a built-in task.")),
    ("max_batch", int, typer.Option(64, help="Prompts per batch.")),
    (
        "batch_tokens",
        int | None,
        typer.Option(
            DEFAULT_BATCH_TOKENS,
            help="And at most this many tokens per batch: the memory bound (docs: Benchmarks).",
        ),
    ),
    (
        "device",
        str,
        typer.Option("auto", help="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps."),
    ),
    ("dtype", str, typer.Option("float32", help="float32, bfloat16 or float16.")),
    (
        "metric",
        str | None,
        typer.Option(
            None,
            help="logit_diff, prob_diff, logprob or kl (default: the task's own, logit_diff "
            "unless its file names one).",
        ),
    ),
]
EXECUTOR_HELP = "local (this process) or ray (a Ray cluster; needs the ray extra)."
ADDRESS_HELP = "The Ray cluster to join (default: a new local Ray instance)."
LOCK_WAIT_HELP = (
    "Seconds to wait for the database lock while another process holds it, before a computed "
    "run is kept beside the database for the next run to store (default: $WORKBENCH_LOCK_WAIT, "
    "else 3600; 0: no limit)."
)


def _lock_wait_option(value: float | None) -> float | None:
    """--lock-wait N stands for WORKBENCH_LOCK_WAIT=N in this process (the runner reads it)."""
    if value is not None:
        from workbench.store.db import LOCK_WAIT_ENV, run_lock_wait

        run_lock_wait(value)  # a bad value is one sentence naming the flag
        os.environ[LOCK_WAIT_ENV] = repr(float(value))
    return value


COMMON_OPTIONS += [
    ("executor", str, typer.Option("local", help=EXECUTOR_HELP)),
    ("address", str | None, typer.Option(None, help=ADDRESS_HELP)),
    (
        "lock_wait",
        float | None,
        typer.Option(None, "--lock-wait", help=LOCK_WAIT_HELP, callback=_lock_wait_option),
    ),
]


def _option_params(pipes: list[Any]) -> list[inspect.Parameter]:
    """Typer parameters for the options of the pipelines' methods (from their params
    dataclasses): `--flag` from the field name (or its `flag`), repeatable for lists."""
    from workbench.registry import is_list_type

    out: dict[str, inspect.Parameter] = {}
    for p in pipes:
        for name, f in p.options().items():
            if name in out:
                continue
            tp = p.option_type(name)
            meta = f.metadata
            flag = "--" + (meta.get("flag") or name).replace("_", "-")
            help_text = meta.get("help", "")
            if meta.get("choices"):
                help_text += f" [{'|'.join(meta['choices'])}]"
            default = f.default if f.default is not dataclasses.MISSING else None
            if is_list_type(tp):
                tp, default = list[str] | None, None
            option = typer.Option(default, flag, help=help_text, show_default=default is not None)
            out[name] = inspect.Parameter(
                name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=tp
            )
    return list(out.values())


def _run_command(name: str, pipes: list[Any], summary: str) -> Any:
    common = [
        inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=tp)
        for n, tp, opt in COMMON_OPTIONS
    ]
    specific = _option_params(pipes)
    ctx_param = inspect.Parameter(
        "ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context
    )

    def command(ctx: typer.Context, **values: Any) -> int:
        from workbench.jobs import RunOptions, plan_all
        from workbench.runner import run_planned

        given = {
            p.name: values[p.name]
            for p in specific
            if getattr(ctx.get_parameter_source(p.name), "name", "DEFAULT")
            not in ("DEFAULT", "DEFAULT_MAP")
        }
        given = {k: ([] if v is None else v) for k, v in given.items()}
        options = RunOptions(**{n: values[n] for n, _, _ in COMMON_OPTIONS if n != "method"})
        jobs = plan_all([p.name for p in pipes], options, values["method"], given)
        return _echo_outcomes(run_planned(jobs, options))

    params = [ctx_param, *common, *specific]
    command.__signature__ = inspect.Signature(params, return_annotation=int)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params} | {"return": int}
    command.__doc__ = summary
    return command


def _echo_outcomes(outcomes: list[Any]) -> int:
    """One line per run (status, checkpoint, method, run id, the error of a failed one); the
    exit status: 1 if any failed, else 0."""
    for o in outcomes:
        detail = f" ({o.error})" if o.error else ""
        typer.echo(f"{o.status:8} {o.checkpoint_id}  {o.method}  {o.run_id or ''}{detail}")
    return 1 if any(o.status == "failed" for o in outcomes) else 0


def _register_run_commands() -> None:
    from workbench.registry import pipelines

    known = pipelines()
    for p in known.values():
        defaults = ", ".join(p.default_methods) or "all; left out of `run all`"
        lines = [f"The {p.name} pipeline. Methods (default: {defaults}):"]
        lines += [f"{m.name}: {m.summary}." for m in p.methods]
        run_app.command(p.name, help="\n\n".join(lines))(_run_command(p.name, [p], lines[0]))
    every = list(known.values())
    run_app.command(
        "all",
        help="Every pipeline's default methods (or the --method values that are its own); the "
        "sae pipeline only with --hook or --sae.",
    )(_run_command("all", every, "every pipeline"))


_register_run_commands()


@run_app.command("prompt")
def run_prompt_command(
    model: ModelOption,
    text: TextOption = None,
    task: TaskOption = None,
    index: IndexOption = 0,
    checkpoint: CheckpointOption = "latest",
    tau: Annotated[
        float, typer.Option(help="Information-flow routes keep edges of this importance or more.")
    ] = 0.04,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "float32",
    db: DbOption = None,
    force: ForceOption = False,
    flow_seconds: Annotated[
        float,
        typer.Option(help="Stop with an error if attention flow takes longer (0: no limit)."),
    ] = 300.0,
    target: Annotated[
        str | None,
        typer.Option(
            help="The token whose logit input attribution explains: one token of the "
            "tokenizer (' Paris'), or #ID (default: the model's prediction)."
        ),
    ] = None,
    attribution: Annotated[
        str | None,
        typer.Option(
            help="Input-attribution methods, comma-separated, or all or none (default: every "
            "method that applies to the model)."
        ),
    ] = None,
    attr_baseline: Annotated[
        str, typer.Option(help="What replaces a token's embedding: zero or mean (of W_E's rows).")
    ] = "zero",
    ig_steps: Annotated[
        int, typer.Option(help="Integrated gradients' Gauss-Legendre points.")
    ] = 64,
    shapley_samples: Annotated[
        int, typer.Option(help="Shapley value sampling's random token orders.")
    ] = 25,
    seed: Annotated[int, typer.Option(help="Shapley value sampling's seed.")] = 0,
    atman_suppression: Annotated[
        float, typer.Option(help="AtMan: attention scores to a token are scaled by 1 - this.")
    ] = 0.9,
    patchscope: Annotated[
        bool, typer.Option(help="Decode each layer's hidden state with Patchscope.")
    ] = True,
    patchscope_template: Annotated[
        str | None,
        typer.Option(
            help="The inspection prompt, its last token the placeholder; ids:... for token ids "
            "(default: the identity prompt)."
        ),
    ] = None,
    patchscope_position: Annotated[
        int, typer.Option(help="The source prompt's position to decode (-1: the last).")
    ] = -1,
    patchscope_layer: Annotated[
        int | None,
        typer.Option(
            help="The inspection prompt's stream to patch into (default: the source's own)."
        ),
    ] = None,
    patchscope_tokens: Annotated[int, typer.Option(help="Tokens Patchscope decodes greedily.")] = 6,
    patchscope_model: Annotated[
        str | None,
        typer.Option(help="Decode with another model of the same width (default: the same)."),
    ] = None,
    patchscope_checkpoint: Annotated[
        str, typer.Option(help="That model's checkpoint: latest or a step.")
    ] = "latest",
) -> int:
    """One prompt at each chosen checkpoint: attention patterns, logit lens, direct logit
    attribution, attention rollout and flow, information-flow routes (tables prompt_*); the input
    attribution of its prediction by every method with faithfulness curves and agreement
    (prompt_explanations, prompt_input_attr, prompt_attr_*); Patchscope (prompt_patchscope)."""
    from workbench.prompt.inputattr import AttributionParams, parse_methods
    from workbench.prompt.patchscope import PatchscopeParams
    from workbench.prompt.run import run_prompt

    scope = (
        PatchscopeParams(
            template=patchscope_template,
            source_position=patchscope_position,
            target_layer=patchscope_layer,
            new_tokens=patchscope_tokens,
            model=patchscope_model,
            checkpoint=patchscope_checkpoint,
        )
        if patchscope
        else None
    )
    for pid, status in run_prompt(
        model,
        text=text,
        task=task,
        index=index,
        checkpoint=checkpoint,
        tau=tau,
        device=device,
        dtype=dtype,
        db=db,
        force=force,
        flow_seconds=flow_seconds,
        target=target,
        methods=None if attribution is None else parse_methods(attribution),
        attribution=AttributionParams(
            baseline=attr_baseline,
            ig_steps=ig_steps,
            shapley_samples=shapley_samples,
            seed=seed,
            atman_suppression=atman_suppression,
        ),
        patchscope=scope,
    ):
        typer.echo(f"{status:<8} prompt {pid}")
    return 0


@run_app.command("tuned-lens")
def run_tuned_lens_command(
    model: ModelOption,
    task: TaskOption = None,
    checkpoint: CheckpointOption = "latest",
    corpus: Annotated[
        str, typer.Option(help="'task' (the task's distribution; needs --task), a .txt or .jsonl.")
    ] = "task",
    corpus_tokens: Annotated[int, typer.Option(help="Tokens of the corpus.")] = 2**17,
    context_size: Annotated[
        int | None, typer.Option(help="Tokens per corpus window (default min(n_ctx, 128)).")
    ] = None,
    steps: Annotated[int, typer.Option(help="Training steps (tuned-lens's own: 250).")] = 50,
    tokens_per_step: Annotated[
        int, typer.Option(help="Tokens per step (tuned-lens's own: 262144).")
    ] = 2048,
    lr_scale: Annotated[float, typer.Option(help="Learning rate, as a multiple of 1.")] = 1.0,
    seed: Annotated[int, typer.Option(help="The windows' shuffling seed.")] = 0,
    lens_dir: Annotated[
        str | None,
        typer.Option(help="Where lenses are kept (default: lenses/ beside the database)."),
    ] = None,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "float32",
    db: DbOption = None,
    force: ForceOption = False,
) -> int:
    """Train a tuned lens (Belrose et al. 2023) at each chosen checkpoint on a corpus and store it
    (tables tuned_lenses, lens_metrics: each layer's held-out KL, tuned and logit lens); `run
    prompt` shows it beside the logit lens."""
    from workbench.prompt.lensrun import run_tuned_lens
    from workbench.prompt.tunedlens import TunedLensConfig

    config = TunedLensConfig(
        steps=steps, tokens_per_step=tokens_per_step, lr_scale=lr_scale, seed=seed
    )
    for lid, status in run_tuned_lens(
        model,
        task=task,
        checkpoint=checkpoint,
        corpus=corpus,
        corpus_tokens=corpus_tokens,
        context_size=context_size,
        config=config,
        lens_dir=lens_dir,
        device=device,
        dtype=dtype,
        db=db,
        force=force,
    ):
        typer.echo(f"{status:<8} tuned lens {lid}")
    return 0


@run_app.command("catalogue")
def run_catalogue_command(
    model: ModelOption,
    checkpoint: CheckpointOption = "latest",
    sequences: Annotated[
        int, typer.Option(help="Random token sequences (each repeated once) to read heads on.")
    ] = 16,
    length: Annotated[
        int | None,
        typer.Option(help="Tokens before the repeat (default: up to 50, as the context allows)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the sequences' random tokens.")] = 0,
    needle_context: Annotated[
        int | None,
        typer.Option(help="Tokens of a retrieval prompt with its answer (default: up to 64)."),
    ] = None,
    relations: Annotated[
        str | None,
        typer.Option(help="A JSONL file of relations to score heads' OV circuits on (MAPS)."),
    ] = None,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "float32",
    db: DbOption = None,
    force: ForceOption = False,
) -> int:
    """Every head's catalogue at each chosen checkpoint, no task needed: previous-token,
    duplicate-token, induction, sink and dormant scores from attention on repeated random
    tokens, retrieval scores on needle-in-a-haystack prompts, OV copying, Q/K/V composition,
    top token mappings and relation scores from the weights (tables catalogues,
    head_catalogue, head_composition, head_mappings)."""
    from workbench.catalogue.run import run_catalogue

    for cid, status in run_catalogue(
        model,
        checkpoint=checkpoint,
        n_sequences=sequences,
        length=length,
        seed=seed,
        device=device,
        dtype=dtype,
        db=db,
        force=force,
        needle_context=needle_context,
        relations=relations,
    ):
        typer.echo(f"{status:<8} catalogue {cid}")
    return 0


@run_app.command("cross-recovery")
def run_cross_recovery_command(
    model: ModelOption,
    task: Annotated[str, typer.Option(help="The task the circuits were found on.")],
    method: Annotated[
        str, typer.Option(help="The edge method whose stored circuits are compared.")
    ] = "eap",
    max_checkpoints: Annotated[
        int,
        typer.Option(help="Beyond this many checkpoints, an evenly spaced subset of them."),
    ] = 12,
    n_prompts: NPromptsOption = None,
    max_batch: MaxBatchOption = 64,
    batch_tokens: BatchTokensOption = DEFAULT_BATCH_TOKENS,
    metric: MetricOption = None,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "float32",
    db: DbOption = None,
    force: ForceOption = False,
) -> int:
    """Each checkpoint's stored circuit (of --method on --task) evaluated at every other
    checkpoint of the training run: its faithfulness there (table cross_recovery)."""
    from workbench.crossrecovery import run_cross_recovery
    from workbench.jobs import RunOptions

    options = RunOptions(
        model=model, task=task, db=db, force=force, n_prompts=n_prompts, max_batch=max_batch,
        batch_tokens=batch_tokens, device=device, dtype=dtype, metric=metric,
    )  # fmt: skip
    for checkpoint_id, status in run_cross_recovery(
        options, method=method, max_checkpoints=max_checkpoints
    ):
        typer.echo(f"{status:<8} cross-recovery at {checkpoint_id}")
    return 0


@run_app.command("seeds")
def run_seeds_command(
    model: Annotated[
        list[str],
        typer.Option(help="A training run of one seed (repeat: two or more)."),
    ],
    task: Annotated[str, typer.Option(help="The task (built-in name or JSONL).")],
    method: Annotated[str, typer.Option(help="The edge method whose circuits are compared.")] = (
        "eap"
    ),
    group: Annotated[
        str | None,
        typer.Option(help="The seed group's name (default: seeds- and a hash of the models)."),
    ] = None,
    checkpoint: Annotated[
        str, typer.Option(help="all, latest or a step, among the steps every model has.")
    ] = "latest",
    n_prompts: NPromptsOption = None,
    max_batch: MaxBatchOption = 64,
    batch_tokens: BatchTokensOption = DEFAULT_BATCH_TOKENS,
    metric: MetricOption = None,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "float32",
    db: DbOption = None,
    force: ForceOption = False,
) -> int:
    """The same circuit on several training seeds of one model: the edge method on each, each
    circuit evaluated on the other seeds' models (table seed_groups, view seed_stability)."""
    from workbench.jobs import RunOptions
    from workbench.seeds import run_seeds

    options = RunOptions(
        model=model[0], task=task, checkpoint=checkpoint, db=db, force=force,
        n_prompts=n_prompts, max_batch=max_batch, batch_tokens=batch_tokens, device=device,
        dtype=dtype, metric=metric,
    )  # fmt: skip
    result = run_seeds(model, options, method=method, group=group)
    status = _echo_outcomes(result.outcomes)
    for checkpoint_id, evaluated in result.evaluated:
        typer.echo(f"{evaluated:<8} seeds' circuits at {checkpoint_id}")
    typer.echo(f"seed group {result.group_id}: SELECT * FROM seed_stability")
    return status


@run_app.command("graph")
def run_graph_command(
    model: ModelOption,
    transcoders: Annotated[
        str,
        typer.Option(
            help="A stored transcoder set (tc-..., from `workbench run transcoders`) or a set "
            "directory (SAELens or circuit-tracer format)."
        ),
    ],
    text: TextOption = None,
    task: TaskOption = None,
    index: IndexOption = 0,
    checkpoint: CheckpointOption = "latest",
    max_n_logits: Annotated[int, typer.Option(help="At most this many logit nodes.")] = 10,
    desired_logit_prob: Annotated[
        float, typer.Option(help="Logit nodes until their probabilities reach this.")
    ] = 0.95,
    max_feature_nodes: Annotated[
        int, typer.Option(help="At most this many feature nodes, by influence (0: all).")
    ] = 4096,
    node_threshold: Annotated[
        float, typer.Option(help="Pruning keeps nodes up to this share of influence.")
    ] = 0.8,
    edge_threshold: Annotated[
        float, typer.Option(help="Pruning keeps edges up to this share of influence.")
    ] = 0.98,
    batch_size: Annotated[
        int, typer.Option(help="Backward passes at once (memory: this many prompt copies).")
    ] = 32,
    update_interval: Annotated[
        int,
        typer.Option(
            help="With a feature cap: batches between re-rankings of the features by influence."
        ),
    ] = 4,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "float32",
    db: DbOption = None,
    force: ForceOption = False,
) -> int:
    """The attribution graph of one prompt through a transcoder set (Ameisen et al. 2025), at
    each chosen checkpoint: nodes, pruned edges and scores (tables graphs, graph_*)."""
    from workbench.transcoders.run import GraphParams, run_graph

    params = GraphParams(
        max_n_logits=max_n_logits,
        desired_logit_prob=desired_logit_prob,
        max_feature_nodes=max_feature_nodes or None,
        node_threshold=node_threshold,
        edge_threshold=edge_threshold,
        batch_size=batch_size,
        update_interval=update_interval,
    )
    for gid, status in run_graph(
        model,
        transcoders,
        text=text,
        task=task,
        index=index,
        checkpoint=checkpoint,
        params=params,
        device=device,
        dtype=dtype,
        db=db,
        force=force,
    ):
        typer.echo(f"{status:<8} graph {gid}")
    return 0


@app.command("intervene")
def intervene(
    set_: Annotated[
        list[str],
        typer.Option(
            "--set",
            help="LAYER:POSITION:FEATURE=VALUE: set a feature (repeatable; 0 removes it, a "
            "negative position counts from the end).",
        ),
    ],
    graph: Annotated[
        str | None,
        typer.Option(help="A stored graph (g-...): its model, checkpoint, transcoders and prompt."),
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="A model directory, run directory or TL name.")
    ] = None,
    transcoders: Annotated[
        str | None, typer.Option(help="A stored transcoder set (tc-...) or a set directory.")
    ] = None,
    text: TextOption = None,
    checkpoint: Annotated[str, typer.Option(help="latest or a step number.")] = "latest",
    top: Annotated[int, typer.Option(help="Tokens shown: the top of either distribution.")] = 10,
    format: Annotated[
        OutputFormat, typer.Option("--format", help="table, csv or json.")
    ] = OutputFormat.table,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "float32",
    db: DbOption = None,
) -> int:
    """Set transcoder features in the model with its transcoders spliced in, and show how the
    next-token distribution moves (nothing is stored): on a stored graph's prompt (--graph), or
    on --model, --transcoders and --text."""
    import csv
    import io
    import json

    from workbench.transcoders.run import run_intervention

    rows = run_intervention(
        model, transcoders, text, set_, checkpoint=checkpoint, top=top, device=device,
        dtype=dtype, db=db, graph=graph,
    )  # fmt: skip
    if format == OutputFormat.json:
        typer.echo(json.dumps(rows))
    elif format == OutputFormat.csv:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=["token", "id", "before", "after"])
        writer.writeheader()
        writer.writerows(rows)
        typer.echo(out.getvalue(), nl=False)
    else:
        typer.echo(f"{'token':<20} {'before':>9} {'after':>9}")
        for r in rows:
            typer.echo(f"{r['token']!r:<20} {r['before']:>9.4f} {r['after']:>9.4f}")
    return 0


@app.command("sql")
def sql(
    query: Annotated[str, typer.Argument(help="A SQL query over the store (read-only).")],
    format: Annotated[
        OutputFormat, typer.Option("--format", help="table, csv or json.")
    ] = OutputFormat.table,
    timeout: Annotated[
        float, typer.Option(help="Stop the query after this many seconds (0: no limit).")
    ] = 300.0,
    max_rows: Annotated[
        int, typer.Option(help="Print at most this many rows (0: all of them).")
    ] = 100_000,
    max_bytes: Annotated[
        str,
        typer.Option(help="Stop fetching once the rows pass this size, e.g. 256MB (0: no limit)."),
    ] = "256MB",
    max_memory: Annotated[
        str, typer.Option(help="Memory the query may use, e.g. 4GB (0: no bound).")
    ] = "4GB",
    max_spill: Annotated[
        str, typer.Option(help="Temporary disk the query may spill to, e.g. 1GB (0: no cap).")
    ] = "1GB",
    db: DbOption = None,
) -> None:
    """Run a read-only SQL query and print the result (control characters shown escaped).

    It runs in a process of its own, killed at --timeout; its memory, spill and bytes are
    bounded."""
    from workbench.store.query import format_size, parse_size, run_console_query, write_table

    limit_bytes = parse_size(max_bytes, option="--max-bytes")
    result = run_console_query(
        query,
        db=db,
        timeout=timeout or None,
        max_rows=max_rows or None,
        max_bytes=limit_bytes,
        max_memory=parse_size(max_memory, option="--max-memory"),
        max_spill=parse_size(max_spill, option="--max-spill"),
    )
    write_table(result.table, format.value, sys.stdout)
    sys.stdout.flush()
    if result.cut == "bytes" and limit_bytes is not None:
        typer.echo(
            f"note: the first {result.table.num_rows} rows are shown (the --max-bytes budget "
            f"of {format_size(limit_bytes)}); the query has more (aggregate, add a LIMIT, or "
            "pass a larger --max-bytes)",
            err=True,
        )
    elif result.truncated:
        typer.echo(
            f"note: the first {max_rows} rows are shown; the query has more "
            "(aggregate, add a LIMIT, or pass --max-rows 0)",
            err=True,
        )


@app.command("watch")
def watch(
    directory: Annotated[Path, typer.Argument(help="Directory a trainer writes checkpoints to.")],
    config: Annotated[
        Path, typer.Option("--config", help="TOML: [[job]] tables (pipeline, task, methods, ...).")
    ],
    every: Annotated[float, typer.Option(help="Seconds between scans.")] = 30.0,
    once: Annotated[
        bool, typer.Option("--once", help="Scan once, run what is missing, exit (cron).")
    ] = False,
    retry_failed: Annotated[
        bool, typer.Option("--retry-failed", help="Retry checkpoints that failed before.")
    ] = False,
    executor: Annotated[str, typer.Option(help=EXECUTOR_HELP)] = "local",
    address: Annotated[str | None, typer.Option(help=ADDRESS_HELP)] = None,
    lock_wait: Annotated[float | None, typer.Option("--lock-wait", help=LOCK_WAIT_HELP)] = None,
    db: DbOption = None,
) -> int:
    """Analyse every checkpoint written under DIRECTORY with the config's jobs, as it appears.

    Exit status: 0 (stopped by SIGTERM/SIGINT, or --once with nothing failed), 1 (--once and a
    run failed), 2 (bad config, or another watcher holds the database)."""
    from workbench.store import default_db_path
    from workbench.watch import Stop, Watcher, read_config, signals_stop, watch_lock

    cfg = read_config(config)
    path = str(default_db_path(db or cfg.db))
    if executor == "ray":  # join the cluster now: a wrong --address is exit 2 before any scan
        from workbench.executor_ray import connect

        connect(address)
    stop = Stop()
    watcher = Watcher(
        directory,
        cfg,
        db=path,
        retry_failed=retry_failed,
        stop=stop,
        executor=executor,
        address=address,
        lock_wait=lock_wait,
    )
    with watch_lock(path), signals_stop(stop):
        return watcher.run(every=every, once=once)


@app.command("migrate")
def migrate(db: DbOption = None) -> None:
    """Upgrade a database to this workbench's schema (readers never do it themselves), and
    rewrite stored token strings as token texts where a checkpoint's tokenizer loads."""
    from workbench.store import SCHEMA_VERSION, Store, default_db_path
    from workbench.token_text import decode_pending

    path = default_db_path(db)
    if not path.exists():
        raise BadInput(f"{path}: no database here")
    with Store(path) as store:
        old = store.migrated_from
        left = decode_pending(store)
    done = f"migrated from v{old} to" if old is not None else "already at"
    typer.echo(f"{path}: {done} schema v{SCHEMA_VERSION}")
    if left:
        typer.echo(
            f"{len(left)} checkpoint(s) keep their tokenizer's pieces as token strings until "
            f"their tokenizer can be loaded: {', '.join(left)}"
        )


FormatOption = Annotated[GraphFormat, typer.Option("--format", help="graphml or json.")]


@export_app.command("circuit")
def export_circuit_command(
    circuit_id: Annotated[str, typer.Argument(help="A circuits.circuit_id.")],
    format: FormatOption = GraphFormat.graphml,
    db: DbOption = None,
) -> None:
    """Print a stored circuit (nodes, edges with scores, provenance) as GraphML or JSON."""
    from workbench.export import export_circuit

    typer.echo(export_circuit(circuit_id, format.value, db=db), nl=False)


@export_app.command("subgraph")
def export_subgraph_command(
    subgraph_id: Annotated[str, typer.Argument(help="A subgraphs.subgraph_id.")],
    format: FormatOption = GraphFormat.graphml,
    db: DbOption = None,
) -> None:
    """Print a curated subgraph (its nodes with groups and notes, edges with scores and notes,
    where it came from) as GraphML or JSON."""
    from workbench.export import export_subgraph

    typer.echo(export_subgraph(subgraph_id, format.value, db=db), nl=False)


@export_app.command("graph")
def export_graph_command(
    graph_id: Annotated[str, typer.Argument(help="A graphs.graph_id.")],
    db: DbOption = None,
) -> None:
    """Print a stored attribution graph (its kept nodes and edges) as Neuronpedia's graph JSON,
    the layout circuit-tracer writes."""
    from workbench.transcoders.neuronpedia import export_graph

    typer.echo(export_graph(graph_id, db=db), nl=False)


@import_app.command("graph")
def import_graph_command(
    path: Annotated[Path, typer.Argument(help="A Neuronpedia graph JSON file.")],
    checkpoint_id: Annotated[
        str | None, typer.Option(help="The stored checkpoint the graph was made on, if any.")
    ] = None,
    db: DbOption = None,
) -> None:
    """Store a Neuronpedia graph JSON file (as circuit-tracer writes it) as a graph."""
    from workbench.transcoders.neuronpedia import import_graph

    typer.echo(f"stored   graph {import_graph(path, db, checkpoint_id=checkpoint_id)}")


APP_TOKEN_ENV = "WORKBENCH_APP_TOKEN"
LOOPBACK = "127.0.0.1"
AddressOption = Annotated[
    str,
    typer.Option(
        "--address",
        help="Interface to listen on (default 127.0.0.1: this machine only). Any other address "
        "makes every page ask for the token in $WORKBENCH_APP_TOKEN (one is made and printed "
        "when it is unset).",
    ),
]


@app.command("app")
def app_command(
    db: DbOption = None,
    port: Annotated[int, typer.Option(help="Port.")] = 8501,
    address: AddressOption = LOOPBACK,
    read_only: Annotated[
        bool,
        typer.Option(
            "--read-only",
            help="Save nothing, start no model processes ($WORKBENCH_APP_READ_ONLY=1).",
        ),
    ] = False,
    max_processes: Annotated[
        int | None,
        typer.Option(
            help="Model processes the app runs at once, all sessions together "
            "($WORKBENCH_APP_MAX_PROCESSES, default 2)."
        ),
    ] = None,
    process_timeout: Annotated[
        float | None,
        typer.Option(
            help="Seconds before a model process the app started is killed "
            "($WORKBENCH_APP_PROCESS_TIMEOUT, default 600)."
        ),
    ] = None,
    task_dir: Annotated[
        list[Path] | None,
        typer.Option(
            "--task-dir",
            help="A directory whose JSONL task files the app may read; repeatable "
            "($WORKBENCH_APP_TASK_DIRS; default: built-in tasks only).",
        ),
    ] = None,
) -> int:
    """Start the Streamlit app (streamlit run app/main.py), on 127.0.0.1 unless --address."""
    policy = _app_policy(
        read_only=read_only,
        max_processes=max_processes,
        process_timeout=process_timeout,
        task_dirs=task_dir or [],
    )
    return _start_app(db, port, address=address, policy=policy)


def _app_main() -> str:
    """The app's script, wherever the package is installed (a wheel or a source checkout):
    found by import machinery, never relative to the current directory."""
    import importlib.util

    spec = importlib.util.find_spec("workbench.app.main")
    if spec is None or spec.origin is None:
        raise BadInput(
            "the app is not installed with this workbench (module workbench.app.main missing)"
        )
    return spec.origin


def _app_policy(
    *,
    read_only: bool,
    max_processes: int | None,
    process_timeout: float | None,
    task_dirs: list[Path],
) -> dict[str, str]:
    """The app's limits as the environment variables the server reads (only those given)."""
    env: dict[str, str] = {}
    if read_only:
        env["WORKBENCH_APP_READ_ONLY"] = "1"
    if max_processes is not None:
        if max_processes < 1:
            raise BadInput(f"--max-processes must be 1 or more, not {max_processes}")
        env["WORKBENCH_APP_MAX_PROCESSES"] = str(max_processes)
    if process_timeout is not None:
        if not process_timeout > 0 or process_timeout == float("inf"):
            raise BadInput(
                f"--process-timeout must be a positive number of seconds, not {process_timeout}"
            )
        seconds = int(process_timeout) if process_timeout.is_integer() else process_timeout
        env["WORKBENCH_APP_PROCESS_TIMEOUT"] = str(seconds)
    for path in task_dirs:
        if not path.is_dir():
            raise BadInput(f"--task-dir {path}: no such directory")
    if task_dirs:
        env["WORKBENCH_APP_TASK_DIRS"] = os.pathsep.join(str(p.resolve()) for p in task_dirs)
    return env


def _start_app(
    db: str | None, port: int, *, address: str = LOOPBACK, policy: dict[str, str] | None = None
) -> int:
    """Serve the app until it ends or this process is told to stop (SIGTERM, SIGINT: passed on
    to the server); returns the server's exit status."""
    from workbench.store import default_db_path

    if not 0 < port < 65536:
        raise BadInput(f"--port must be between 1 and 65535, not {port}")
    if not address.strip():
        raise BadInput("--address must name an interface, e.g. 127.0.0.1 or 0.0.0.0")
    env = {**os.environ, **(policy or {}), "WORKBENCH_DB": str(default_db_path(db).resolve())}
    stop_timeout = _stop_timeout(env)
    cmd = [sys.executable, "-m", "streamlit", "run", _app_main(), "--server.port", str(port)]
    cmd += ["--server.address", address]
    cmd += ["--server.headless", "true", "--browser.gatherUsageStats", "false"]
    _announce_app(address, port, env)
    return _serve(cmd, env, stop_timeout=stop_timeout)


def _announce_app(address: str, port: int, env: dict[str, str]) -> None:
    """Say where the app is; served beyond loopback without a token, make one (into `env`)
    and print the one link that carries it."""
    import secrets
    import socket

    if address in ("0.0.0.0", "::"):
        host = socket.gethostname()
    else:
        host = f"[{address}]" if ":" in address else address
    url = f"http://{host}:{port}/"
    from workbench.net import is_loopback

    if is_loopback(address) and not env.get(APP_TOKEN_ENV):
        typer.echo(f"starting the app on {url} (Ctrl-C to stop)")
    elif env.get(APP_TOKEN_ENV):
        typer.echo(f"starting the app on {url} (Ctrl-C to stop); it asks for ${APP_TOKEN_ENV}")
    else:
        env[APP_TOKEN_ENV] = secrets.token_urlsafe(32)
        typer.echo(f"starting the app on {address}:{port} (Ctrl-C to stop); open it with")
        typer.echo(f"{url}?token={env[APP_TOKEN_ENV]}")


def _stop_timeout(env: dict[str, str]) -> float:
    """Seconds the server gets to stop after a signal before it is killed
    ($WORKBENCH_APP_STOP_TIMEOUT, default 10)."""
    raw = env.get("WORKBENCH_APP_STOP_TIMEOUT", "10")
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise BadInput(f"WORKBENCH_APP_STOP_TIMEOUT={raw!r} is not a positive number of seconds")
    return seconds


def _serve(cmd: list[str], env: dict[str, str], *, stop_timeout: float) -> int:
    """Run `cmd` in a process group of its own; SIGTERM and SIGINT sent to this process are
    passed on to it (so Ctrl-C reaches it once), and `stop_timeout` seconds after the first of
    them it is killed. Returns its exit status (128 + N when signal N ended it)."""
    import signal
    import threading

    signalled: list[float] = []
    child: list[subprocess.Popen] = []

    def forward(signum: int, frame: object) -> None:
        signalled.append(time.monotonic())
        if child and child[0].poll() is None:
            child[0].send_signal(signum)

    handled = (signal.SIGTERM, signal.SIGINT)
    in_main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, forward) for sig in handled} if in_main else {}
    try:
        child.append(subprocess.Popen(cmd, env=env, process_group=0))
        if signalled:  # a signal came while it was starting
            child[0].terminate()
        return _wait_for_server(child[0], signalled, stop_timeout=stop_timeout)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if child and child[0].poll() is None:  # this process is ending for another reason
            child[0].kill()
            child[0].wait()


def _wait_for_server(proc: subprocess.Popen, signalled: list[float], *, stop_timeout: float) -> int:
    while True:
        try:
            code = proc.wait(timeout=0.2)
            return 128 - code if code < 0 else code
        except subprocess.TimeoutExpired:
            if signalled and time.monotonic() - signalled[0] > stop_timeout:
                logger.warning(
                    "the app did not stop %.0f s after the signal; killing it", stop_timeout
                )
                proc.kill()


@app.command("demo")
def demo(
    no_app: Annotated[
        bool, typer.Option("--no-app", help="Do not start the app at the end.")
    ] = False,
    db: DbOption = None,
    zoo_dir: Annotated[Path, typer.Option(help="Where the zoo checkpoints live.")] = DEFAULT_ZOO,
    port: Annotated[int, typer.Option(help="App port.")] = 8501,
    address: AddressOption = LOOPBACK,
) -> int:
    """The embedded default end to end: zoo, every pipeline on every checkpoint, SAEs on the
    final checkpoints, each task's first prompt (its prompt views and, on the model with MLPs,
    transcoders and its attribution graph), then the app."""
    from workbench.demo import prompt_extras
    from workbench.jobs import RunOptions, demo_jobs
    from workbench.runner import run_jobs
    from workbench.zoo import ZOO_TASKS, TrainConfig, train_zoo_model

    started = time.perf_counter()
    status = 0
    for task in ("induction", "ioi"):
        run_dir = zoo_dir / task
        if not any(run_dir.glob("step_*")):
            typer.echo(f"training the {task} zoo model into {run_dir} ...")
            train_zoo_model(TrainConfig(task=task, out=str(zoo_dir)))
        every = RunOptions(model=str(run_dir), task=task, checkpoint="all", db=db)
        outcomes = run_jobs(demo_jobs(every), db=db, hold=True)  # the app starts after
        done = sum(o.status == "done" for o in outcomes)
        skipped = sum(o.status == "skipped" for o in outcomes)
        failed = [o for o in outcomes if o.status == "failed"]
        typer.echo(f"{task}: {done} runs stored, {skipped} already stored, {len(failed)} failed")
        status = 1 if failed else status
        has_mlps = not ZOO_TASKS[task].model_config.get("attn_only", False)
        extras = prompt_extras(str(run_dir), task, db, has_mlps=has_mlps)
        for line in extras:
            typer.echo(f"{task}: {line}")
        status = 1 if any(line.startswith("failed") for line in extras) else status
    typer.echo(f"demo pipelines finished in {time.perf_counter() - started:.1f} s")
    if no_app:
        return status
    return _start_app(db, port, address=address) or status


def cli(argv: list[str] | None = None) -> int:
    """Run the command line on `argv`; returns the exit status."""
    _configure_logging()
    try:
        result = app(args=argv, prog_name="workbench", standalone_mode=False)
    except BadInput as err:
        typer.echo(f"error: {err}", err=True)
        return 2
    except (click.exceptions.Exit, typer.Exit) as err:
        return int(err.exit_code)
    except (click.exceptions.Abort, typer.Abort, KeyboardInterrupt):
        typer.echo("aborted", err=True)
        return 130
    except (click.exceptions.ClickException, typer.exceptions.TyperException) as err:
        # usage errors: click's, and those of the click that typer ships inside itself
        message = err.format_message() if hasattr(err, "format_message") else str(err)
        if type(err).__name__ == "NoArgsIsHelpError":  # a bare command group: its help
            typer.echo(message, err=True)
        else:
            typer.echo(f"error: {message}", err=True)
        return 2
    except Exception as err:  # an internal error: one sentence, the traceback in the debug log
        logger.debug("unexpected error", exc_info=True)
        typer.echo(f"error: {type(err).__name__}: {err}", err=True)
        return 1
    return result if isinstance(result, int) else 0


def _configure_logging() -> None:
    level = os.environ.get("WORKBENCH_LOG", "INFO").upper()
    logging.basicConfig(
        level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def main() -> None:
    finish(cli())


def finish(status: int) -> NoReturn:
    """Exit with `status` without the interpreter's final garbage collections walking every
    object the command left (with TransformerLens imported they took about 1.4 s of a run's
    wall time): whatever is left is freed with the process. Files and the store are closed by
    then, and exit handlers still run. When no non-daemon thread is left (a daemon, such as
    tqdm's monitor, started with the first progress bar, the interpreter's exit would not wait
    for either), the exit handlers run and the standard streams are flushed here, and the
    process ends without the interpreter tearing its modules down object by object (0.22 s to
    0.06 s after a GPT-2-small `run edges`, measured); otherwise the interpreter's own exit
    joins those threads first."""
    gc.freeze()
    main = threading.main_thread()
    if any(t is not main and not t.daemon for t in threading.enumerate()):
        sys.exit(status)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or broken pipe: nothing to flush
            stream.flush()
    os._exit(status)
