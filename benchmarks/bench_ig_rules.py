"""Completeness error of integrated gradients by Riemann rule and number of steps, on the zoo.

For `eap_ig` the sum of the `input` edges' normalised scores, for `sae_attr` the sum of each
SAE's node scores (features and error): exact integrated gradients give 1 in both cases, so
`sum - 1` is the error of the Riemann sum (`workbench.attribution.ig`). Same models, prompts and
gradients for every rule; only the interpolation points differ. The zoo models (induction and
ioi, final checkpoints) and a TopK SAE after each of their layers are trained here.

    python -m benchmarks.bench_ig_rules
"""

import os
import tempfile
import warnings
from pathlib import Path

from workbench.core import Hook

os.environ.setdefault("TQDM_DISABLE", "1")
warnings.filterwarnings("ignore")

STEPS = (5, 10, 20)
RULES = ("left", "right", "midpoint")
HOOKS = (Hook.resid_post(0), Hook.resid_post(1))


def zoo_final(root: Path, task: str):  # type: ignore[no-untyped-def]
    from workbench.models import load_checkpoint, resolve_checkpoints
    from workbench.zoo import TrainConfig, train_zoo_model

    run_dir = root / task
    if not any(run_dir.glob("step_*")):
        train_zoo_model(TrainConfig(task=task, out=str(root), save_every=10_000))
    return run_dir, load_checkpoint(resolve_checkpoints(str(run_dir))[-1])


def trained_saes(run_dir: Path, task: str, loaded, db: Path):  # type: ignore[no-untyped-def]
    from workbench import runner
    from workbench.jobs import RunOptions
    from workbench.sae.saes import load_sae
    from workbench.store import Store

    options = RunOptions(model=str(run_dir), task=task, db=str(db))
    runner.run("sae", options, ["sae_features"], hooks=list(HOOKS))
    with Store(db) as store:
        saes = store.latest_saes(loaded.checkpoint.checkpoint_id)
    return [sid for sid, _ in saes], [load_sae(spec, loaded) for _, spec in saes]


def main() -> None:
    from workbench.attribution import edges
    from workbench.attribution.batches import make_batches
    from workbench.sae import attribution
    from workbench.tasks import load_task

    root = Path(tempfile.mkdtemp(prefix="bench-ig-"))
    rows: list[tuple[str, int, str, list[float]]] = []
    for task in ("induction", "ioi"):
        run_dir, loaded = zoo_final(root / "zoo", task)
        batches = make_batches(load_task(task, loaded))
        sae_ids, saes = trained_saes(run_dir, task, loaded, root / f"{task}.duckdb")
        spliced = attribution.SplicedModel(loaded.model, saes, sae_ids, batches)
        for steps in STEPS:
            for rule in RULES:
                eap_ig = edges.edge_attribution(
                    loaded.model, batches, ig_steps=steps, ig_rule=rule
                ).completeness
                scores, _, _ = attribution.node_attribution(spliced, steps, rule)
                per_sae = attribution.completeness(spliced, scores)
                layer_errors = [per_sae[sid] - 1.0 for sid in sae_ids]
                rows.append((task, steps, rule, [eap_ig - 1.0, *layer_errors]))
    print("| task | steps | rule | eap_ig | sae_attr, layer-0 SAE | sae_attr, layer-1 SAE |")
    print("|---|---|---|---|---|---|")
    for task, steps, rule, errors in rows:
        print(f"| {task} | {steps} | {rule} | " + " | ".join(f"{e:+.4f}" for e in errors) + " |")


if __name__ == "__main__":
    main()
