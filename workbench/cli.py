"""The `workbench` command line (DESIGN.md, "Command line").

Exit status: 0 done, 1 a run failed (recorded in `runs`), 2 bad usage or bad input. Errors are
one sentence naming the bad thing, never a traceback.
"""

import logging
import os
import subprocess
import sys
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import click
import typer

from workbench.core import Hook
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

REPO_ROOT = Path(__file__).resolve().parent.parent
APP_MAIN = REPO_ROOT / "app" / "main.py"
DEFAULT_ZOO = Path("data") / "zoo"
# the demo trains an SAE on the residual stream after each layer of the 2-layer zoo models
DEMO_SAE_HOOKS = (Hook.resid_post(0), Hook.resid_post(1))

DbOption = Annotated[
    str | None,
    typer.Option("--db", help="DuckDB file (default: $WORKBENCH_DB or data/workbench.duckdb)."),
]


class Pipeline(StrEnum):
    heads = "heads"
    patching = "patching"
    edges = "edges"
    sae = "sae"
    all = "all"


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
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
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


@app.command("run")
def run(
    pipeline: Annotated[Pipeline, typer.Argument(help="heads, patching, edges, sae, or all.")],
    model: Annotated[
        str, typer.Option("--model", help="Checkpoint dir, dir of checkpoints, or model name.")
    ],
    task: Annotated[str, typer.Option("--task", help="Built-in task name or a JSONL task file.")],
    checkpoint: Annotated[str, typer.Option(help="all, latest or a step number.")] = "latest",
    method: Annotated[
        list[str] | None, typer.Option("--method", help="Method(s) to run (default: all).")
    ] = None,
    component: Annotated[
        list[str] | None,
        typer.Option("--component", help="What `patching` patches (default: every component)."),
    ] = None,
    by_position: Annotated[
        bool, typer.Option("--by-position", help="Patch each position separately.")
    ] = False,
    ablation: Annotated[
        str, typer.Option(help="Noising ablation for `patching`: resample, zero or mean.")
    ] = "resample",
    ig_steps: Annotated[
        int, typer.Option(help="Interpolation steps for eap_ig and sae_attr (0: none).")
    ] = 5,
    ig_rule: Annotated[
        str,
        typer.Option(
            help="Riemann rule of those steps: right (k=1..N, default), left (k=0..N-1, as "
            "the EAP-IG authors' code) or midpoint (most accurate)."
        ),
    ] = "right",
    device: Annotated[
        str, typer.Option(help="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps.")
    ] = "auto",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    db: DbOption = None,
    force: Annotated[
        bool, typer.Option("--force", help="Re-run even if an identical run is stored.")
    ] = False,
    n_prompts: Annotated[int | None, typer.Option(help="Prompts for a built-in task.")] = None,
    hook: Annotated[
        list[str] | None,
        typer.Option("--hook", help="sae: train an SAE at this hook (repeatable)."),
    ] = None,
    sae: Annotated[
        list[str] | None,
        typer.Option(
            "--sae", help="sae: load a SAELens SAE directory or pretrained:<release>/<sae_id>."
        ),
    ] = None,
    architecture: Annotated[str, typer.Option(help="sae: standard (L1) or topk.")] = "topk",
    expansion: Annotated[int, typer.Option(help="sae: d_sae = expansion * d_in.")] = 4,
    d_sae: Annotated[int | None, typer.Option(help="sae: number of features.")] = None,
    k: Annotated[int, typer.Option("--k", help="sae: active features of a topk SAE.")] = 8,
    l1_coefficient: Annotated[float, typer.Option(help="sae: L1 weight, standard SAE.")] = 1.0,
    training_tokens: Annotated[int, typer.Option(help="sae: tokens to train on.")] = 400_000,
    seed: Annotated[int, typer.Option(help="sae: training seed.")] = 0,
    corpus: Annotated[
        str, typer.Option(help="sae: 'task' (the task's distribution), a .txt or .jsonl file.")
    ] = "task",
    corpus_tokens: Annotated[int, typer.Option(help="sae: tokens in the corpus.")] = 100_000,
    context_size: Annotated[
        int | None, typer.Option(help="sae: tokens per corpus window (default min(n_ctx, 128)).")
    ] = None,
    n_nodes: Annotated[int, typer.Option(help="sae_attr: nodes per SAE kept for edges.")] = 16,
    sae_dir: Annotated[
        str | None, typer.Option(help="sae: where trained SAEs go (default: <db dir>/saes).")
    ] = None,
) -> int:
    """Run a pipeline over one or more checkpoints and store the results."""
    from pipelines import edges, heads, patching
    from pipelines import sae as sae_pipeline
    from pipelines.common import PipelineConfig

    common: dict[str, Any] = {"model": model, "task": task, "checkpoint": checkpoint}
    common |= {"db": db, "force": force, "n_prompts": n_prompts, "device": device, "dtype": dtype}
    patching_options = component or by_position or ablation != "resample"
    if pipeline in (Pipeline.heads, Pipeline.edges) and patching_options:
        raise BadInput("--component, --by-position and --ablation apply to the patching pipeline")
    configs: dict[Pipeline, tuple[Any, PipelineConfig]] = {
        Pipeline.heads: (heads, heads.HeadsConfig(**common)),
        Pipeline.patching: (
            patching,
            patching.PatchingConfig(
                **common, components=component, by_position=by_position, ablation=ablation
            ),
        ),
        Pipeline.edges: (edges, edges.EdgesConfig(**common, ig_steps=ig_steps, ig_rule=ig_rule)),
        Pipeline.sae: (
            sae_pipeline,
            sae_pipeline.SaeConfig(
                **common,
                hooks=hook or [],
                saes=sae or [],
                architecture=architecture,
                expansion=expansion,
                d_sae=d_sae,
                k=k,
                l1_coefficient=l1_coefficient,
                training_tokens=training_tokens,
                seed=seed,
                corpus=corpus,
                corpus_tokens=corpus_tokens,
                context_size=context_size,
                n_nodes=n_nodes,
                ig_steps=ig_steps,
                ig_rule=ig_rule,
                sae_dir=sae_dir,
            ),
        ),
    }
    if (hook or sae) and pipeline not in (Pipeline.sae, Pipeline.all):
        raise BadInput("--hook and --sae apply to the sae pipeline")
    outcomes = []
    for name, (module, cfg) in configs.items():
        if pipeline not in (name, Pipeline.all):
            continue
        if name == Pipeline.sae and pipeline == Pipeline.all and not (hook or sae):
            continue  # `all` trains or loads SAEs only when told which
        # with `all`, each pipeline runs the --method values that are its own
        chosen = [m for m in method or [] if pipeline == name or m in module.METHODS]
        if method and not chosen:
            continue
        cfg.methods = chosen or cfg.methods  # type: ignore[attr-defined]
        outcomes += module.run(cfg)
    for o in outcomes:
        detail = f" ({o.error})" if o.error else ""
        typer.echo(f"{o.status:8} {o.checkpoint_id}  {o.method}  {o.run_id or ''}{detail}")
    return 1 if any(o.status == "failed" for o in outcomes) else 0


@app.command("sql")
def sql(
    query: Annotated[str, typer.Argument(help="A SQL query over the store (read-only).")],
    format: Annotated[
        OutputFormat, typer.Option("--format", help="table, csv or json.")
    ] = OutputFormat.table,
    db: DbOption = None,
) -> None:
    """Run a read-only SQL query and print the result."""
    from workbench.store.query import format_table, run_readonly_query

    table = run_readonly_query(query, db=db)
    typer.echo(format_table(table, format.value), nl=False)


@export_app.command("circuit")
def export_circuit_command(
    circuit_id: Annotated[str, typer.Argument(help="A circuits.circuit_id.")],
    format: Annotated[
        GraphFormat, typer.Option("--format", help="graphml or json.")
    ] = GraphFormat.graphml,
    db: DbOption = None,
) -> None:
    """Print a stored circuit (nodes, edges with scores, provenance) as GraphML or JSON."""
    from workbench.export import export_circuit

    typer.echo(export_circuit(circuit_id, format.value, db=db), nl=False)


@app.command("app")
def app_command(
    db: DbOption = None, port: Annotated[int, typer.Option(help="Port.")] = 8501
) -> int:
    """Start the Streamlit app (streamlit run app/main.py)."""
    return _start_app(db, port)


def _start_app(db: str | None, port: int) -> int:
    from workbench.store import default_db_path

    env = {**os.environ, "WORKBENCH_DB": str(default_db_path(db).resolve())}
    cmd = [sys.executable, "-m", "streamlit", "run", str(APP_MAIN), "--server.port", str(port)]
    cmd += ["--server.headless", "true", "--browser.gatherUsageStats", "false"]
    typer.echo(f"starting the app on http://localhost:{port} (Ctrl-C to stop)")
    return subprocess.call(cmd, env=env)


@app.command("demo")
def demo(
    no_app: Annotated[
        bool, typer.Option("--no-app", help="Do not start the app at the end.")
    ] = False,
    db: DbOption = None,
    zoo_dir: Annotated[Path, typer.Option(help="Where the zoo checkpoints live.")] = DEFAULT_ZOO,
    port: Annotated[int, typer.Option(help="App port.")] = 8501,
) -> int:
    """The embedded default end to end: zoo, every pipeline on every checkpoint, SAEs on the
    final checkpoints, then the app."""
    from pipelines import edges, heads, patching
    from pipelines import sae as sae_pipeline
    from workbench.zoo import TrainConfig, train_zoo_model

    started = time.perf_counter()
    status = 0
    for task in ("induction", "ioi"):
        run_dir = zoo_dir / task
        if not any(run_dir.glob("step_*")):
            typer.echo(f"training the {task} zoo model into {run_dir} ...")
            train_zoo_model(TrainConfig(task=task, out=str(zoo_dir)))
        outcomes = heads.run(
            heads.HeadsConfig(model=str(run_dir), task=task, checkpoint="all", db=db)
        )
        outcomes += patching.run(
            patching.PatchingConfig(model=str(run_dir), task=task, checkpoint="all", db=db)
        )
        outcomes += edges.run(
            edges.EdgesConfig(
                model=str(run_dir), task=task, checkpoint="all", db=db, methods=list(edges.METHODS)
            )
        )
        outcomes += sae_pipeline.run(
            sae_pipeline.SaeConfig(model=str(run_dir), task=task, db=db, hooks=list(DEMO_SAE_HOOKS))
        )
        done = sum(o.status == "done" for o in outcomes)
        skipped = sum(o.status == "skipped" for o in outcomes)
        failed = [o for o in outcomes if o.status == "failed"]
        typer.echo(f"{task}: {done} runs stored, {skipped} already stored, {len(failed)} failed")
        status = 1 if failed else status
    typer.echo(f"demo pipelines finished in {time.perf_counter() - started:.1f} s")
    if no_app:
        return status
    return _start_app(db, port) or status


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
    sys.exit(cli())
