"""The `transcoders` pipeline: train a transcoder for every layer of a model (or load a set),
and store the set's quality, its features' statistics and top examples (see
`workbench.transcoders`). Planning is `workbench.transcoders.plan`, computing
`workbench.transcoders.compute`.

    workbench run transcoders --model data/zoo/ioi --task ioi
    workbench run transcoders --model my-model --task t.jsonl --corpus corpus.txt --expansion 8
    workbench run transcoders --model my-model --task t.jsonl --transcoders path/to/set

The set is stored under the id `tc-<first 10 hex digits of the run key>`; a trained set is
written in SAELens's format (a folder per layer) to `<db directory>/transcoders/<set_id>/`
when its run commits. `workbench run graph` builds attribution graphs on a stored set.
"""

from dataclasses import dataclass
from pathlib import Path

from workbench.registry import Method, PlanContext, Planned, RunInputs, option
from workbench.results import RunResult
from workbench.store.db import default_db_path


@dataclass(frozen=True)
class TranscodersParams:
    transcoders: str | None = option(
        None, "Load this set (SAELens or circuit-tracer format) instead of training one."
    )
    corpus: str = option("task", "'task' (the task's distribution), a .txt or .jsonl file.")
    corpus_tokens: int = option(100_000, "Tokens of the corpus the set is measured on.")
    context_size: int | None = option(None, "Tokens per corpus window (default min(n_ctx, 128)).")
    top_k_examples: int = option(10, "Top activating examples stored per feature.")
    expansion: int = option(4, "Features per layer = expansion * d_model (unless --d-transcoder).")
    d_transcoder: int | None = option(None, "Features per layer.")
    skip: bool = option(True, "Train with a linear skip connection (W_skip).")
    l1_coefficient: float = option(0.2, "Weight of the sparsity penalty (see the methods page).")
    training_tokens: int = option(400_000, "Tokens to train on.")
    batch_size_tokens: int = option(1024, "Tokens per training step.")
    lr: float = option(1e-3, "Learning rate.")
    seed: int = option(0, "Training seed.")
    held_out: float = option(
        0.1, "Share of the corpus's windows (its last) never trained on; quality is measured there."
    )
    transcoder_dir: str | None = option(
        None, "Where trained sets go (default: <db dir>/transcoders)."
    )

    def training(self):  # -> TranscoderTraining (no torch at import)
        from workbench.transcoders.train import TranscoderTraining

        return TranscoderTraining(
            expansion=self.expansion,
            d_transcoder=self.d_transcoder,
            skip=self.skip,
            l1_coefficient=self.l1_coefficient,
            training_tokens=self.training_tokens,
            batch_size_tokens=self.batch_size_tokens,
            lr=self.lr,
            seed=self.seed,
            held_out=self.held_out,
        )


def transcoder_root(params: TranscodersParams, db: str | None) -> Path:
    if params.transcoder_dir:
        return Path(params.transcoder_dir)
    return default_db_path(db).parent / "transcoders"


def _plan(params: TranscodersParams, inputs: RunInputs, ctx: PlanContext) -> list[Planned]:
    from workbench.transcoders.plan import plan_set

    run = plan_set(
        inputs.loaded,
        inputs.task,
        training=params.training(),
        load=params.transcoders,
        corpus=params.corpus,
        corpus_tokens=params.corpus_tokens,
        context_size=params.context_size,
        top_k_examples=params.top_k_examples,
        root=transcoder_root(params, ctx.db),
    )
    return [Planned(run, run.key)]


def _check(params: TranscodersParams) -> None:
    params.training().check()


def compute(inputs: RunInputs, run) -> RunResult:  # run: SetRun
    from workbench.transcoders.compute import compute_set

    return compute_set(inputs.loaded, run, batch_size=inputs.max_batch)


METHODS = (
    Method(
        "transcoders",
        "transcoders",
        TranscodersParams,
        compute,
        key=lambda p: {},
        plan=_plan,
        check=_check,
        default=False,  # the zoo's induction model has no MLPs
        demo=None,
        summary="train (or load) a transcoder per layer; store its quality and features",
    ),
)


if __name__ == "__main__":
    from workbench.pipelines import main

    main("transcoders")
