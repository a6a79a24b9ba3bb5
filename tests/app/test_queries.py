"""The app's read layer (`app/queries.py`): every named query, called through the cached
executor on the session's databases with real arguments, returns the columns the views use;
and no other app module holds SQL."""

import ast
import inspect
from collections.abc import Callable
from pathlib import Path

import duckdb
import pandas as pd
import pytest

from workbench.app import data, queries
from workbench.core import PORTS, Node

APP_DIR = Path(__file__).resolve().parents[2] / "app"

RUN_COLUMNS = ["run_id", "pipeline", "method", "task_id", "step", "checkpoint_id"]
RUN_COLUMNS += ["metric_clean", "metric_corrupt", "ig_rule"]
EDGE_COLUMNS = ["src", "dst", "score", "stderr"]


def _columns(db: Path, table: str) -> list[str]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return [r[0] for r in con.execute(f"DESCRIBE {table}").fetchall()]
    finally:
        con.close()


def _one(db: Path, sql: str, params: list | None = None) -> tuple:
    con = duckdb.connect(str(db), read_only=True)
    try:
        row = con.execute(sql, params or []).fetchone()
    finally:
        con.close()
    assert row is not None, sql
    return row


def _use(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKBENCH_DB", str(db))
    data.query.clear()


def _public() -> set[str]:
    return {
        name
        for name, fn in inspect.getmembers(queries, inspect.isfunction)
        if fn.__module__ == queries.__name__ and not name.startswith("_")
    }


# name -> (call given the real ids of the database, expected columns, must be non-empty)
Case = tuple[Callable[[dict], pd.DataFrame], list[str], bool]

HEADS_DB_CASES: dict[str, Case] = {
    "models": (
        lambda i: queries.models(),
        ["model_id", "architecture", "n_layers", "n_heads"],
        True,
    ),
    "model_table": (
        lambda i: queries.model_table(),
        ["model_id", "architecture", "n_layers", "n_heads", "d_model", "d_vocab", "source"],
        True,
    ),
    "model_shape": (lambda i: queries.model_shape(i["model"]), ["n_layers", "n_heads"], True),
    "store_counts": (
        lambda i: queries.store_counts(),
        ["models", "checkpoints", "tasks", "runs_done", "runs_failed"],
        True,
    ),
    "checkpoints": (
        lambda i: queries.checkpoints(),
        ["checkpoint_id", "model_id", "step", "path", "registered_at"],
        True,
    ),
    "recent_runs": (
        lambda i: queries.recent_runs(500),
        ["run_id", "pipeline", "method", "checkpoint_id", "task_id", "status", "error"]
        + ["metric_clean", "metric_corrupt", "finished_at"],
        True,
    ),
    "done_runs": (lambda i: queries.done_runs(i["model"]), RUN_COLUMNS, True),
    "patching_runs": (
        lambda i: queries.patching_runs(i["model"]),
        ["run_id", "method", "task_id", "step", "component", "positions", "ablation"],
        True,
    ),
    "run_metrics": (lambda i: queries.run_metrics(i["edge_run"]), ["metric", "value"], False),
    "spot_check": (
        lambda i: queries.spot_check(i["edge_run"]),
        ["item", "sample", "estimate", "exact", "difference"],
        True,
    ),
    "head_scores": (
        lambda i: queries.head_scores(i["heads_run"]),
        ["layer", "head", "score", "stderr", "head_id"],
        True,
    ),
    "head_score_history": (
        lambda i: queries.head_score_history(i["model"], i["heads_method"], i["task"]),
        ["step", "node_id", "score"],
        True,
    ),
    "patching_scores": (
        lambda i: queries.patching_scores(i["patching_run"]),
        ["node_id", "position", "score", "layer", "head"],
        True,
    ),
    "node_scores_at_checkpoint": (
        lambda i: queries.node_scores_at_checkpoint(i["checkpoint"], i["head_and_ports"]),
        ["pipeline", "method", "component", "node_id", "position", "score"],
        True,
    ),
    "runs_with_edges": (lambda i: queries.runs_with_edges(i["model"]), ["run_id"], True),
    "edge_run_edges_top": (
        lambda i: queries.edge_run_edges_top(i["edge_run"], 5),
        EDGE_COLUMNS,
        True,
    ),
    "edge_run_edges_above": (
        lambda i: queries.edge_run_edges_above(i["edge_run"], 0.0, 100),
        EDGE_COLUMNS,
        True,
    ),
    "edge_run_edges_share": (
        lambda i: queries.edge_run_edges_share(i["edge_run"], 0.5, 100),
        EDGE_COLUMNS,
        True,
    ),
    "edge_run_size": (lambda i: queries.edge_run_size(i["edge_run"]), ["n", "m"], True),
    "run_info": (
        lambda i: queries.run_info(i["edge_run"]),
        ["model_id", "method", "task_id", "step", "pipeline"],
        True,
    ),
    "faithfulness_curve": (
        lambda i: queries.faithfulness_curve(i["edge_run"]),
        ["n_edges", "faithfulness"],
        True,
    ),
    "circuits": (
        lambda i: queries.circuits(i["model"]),
        ["circuit_id", "name", "rule", "n_edges", "faithfulness", "method", "checkpoint_id"]
        + ["step", "task_id", "label"],
        True,
    ),
    "circuit_edges": (lambda i: queries.circuit_edges(i["circuit"]), ["src", "dst", "score"], True),
    "incident_edges": (
        lambda i: queries.incident_edges(i["checkpoint"], i["head"], i["head_and_ports"]),
        ["method", "src", "dst", "score"],
        True,
    ),
    # work in progress and circuits across training (schema v6)
    "run_queue": (
        lambda i: queries.run_queue(),
        ["status", "pipeline", "method", "checkpoint_id", "task", "run_id", "pid", "host"]
        + ["started_at", "heartbeat_at", "queued_at"],
        False,  # nothing is running while the tests read
    ),
    "loss_curve": (lambda i: queries.loss_curve(i["model"]), ["step", "train_loss"], False),
    "timeline_methods": (
        lambda i: queries.timeline_methods(i["model"]),
        ["pipeline", "method", "task_id", "steps"],
        True,
    ),
    "head_timeline": (
        lambda i: queries.head_timeline(i["model"], "heads", i["heads_method"], i["task"]),
        ["node_id", "layer", "head", "step", "score"],
        True,
    ),
    "head_formation_steps": (
        lambda i: queries.head_formation_steps(i["model"], "heads", i["heads_method"], i["task"]),
        ["node_id", "formation_step", "peak"],
        True,
    ),
    "circuits_by_step": (
        lambda i: queries.circuits_by_step(i["model"]),
        ["circuit_id", "method", "task_id", "step", "n_edges", "faithfulness"]
        + ["faithfulness_lo", "faithfulness_hi"],
        True,
    ),
    "circuit_diff": (
        lambda i: queries.circuit_diff(*i["two_circuits"]),
        ["src", "dst", "status", "score_a", "score_b"],
        True,
    ),
    "node_curves": (
        lambda i: queries.node_curves(i["model"], i["head"]),
        ["series", "step", "score", "stderr"],
        True,
    ),
}

# SAE queries need a database with SAEs and sae_attr runs: the session's SAE run.
HEADS_DB_CASES |= {
    # (no subgraph or prompt is stored in this database: the columns are what is checked here;
    # tests/app/test_curate.py and tests/test_prompt_views.py read stored ones)
    "subgraphs": (
        lambda i: queries.subgraphs(i["model"]),
        ["subgraph_id", "name", "checkpoint_id", "step", "source", "n_nodes", "n_edges"]
        + ["saved_at", "label"],
        False,
    ),
    "subgraph_nodes": (
        lambda i: queries.subgraph_nodes("sg-none"),
        ["node_id", "group_label", "note"],
        False,
    ),
    "subgraph_edges": (
        lambda i: queries.subgraph_edges("sg-none"),
        ["src", "dst", "score", "note"],
        False,
    ),
    "circuits_at": (lambda i: queries.circuits_at(i["checkpoint"]), ["circuit_id", "label"], True),
    "prompts_analysed": (
        lambda i: queries.prompts_analysed(i["model"]),
        ["prompt_id", "checkpoint_id", "step", "text", "tokens", "predicted", "tau", "label"],
        False,
    ),
    "model_source": (
        lambda i: queries.model_source(i["model"]),
        ["source", "step", "checkpoint_id"],
        True,
    ),
    "catalogues": (
        lambda i: queries.catalogues(i["model"]),
        ["catalogue_id", "checkpoint_id", "step", "params", "seconds", "created_at"],
        True,
    ),
    "catalogue_scores": (
        lambda i: queries.catalogue_scores(i["catalogue"]),
        ["node_id", "layer", "head", "score", "value"],
        True,
    ),
    "catalogue_composition": (
        lambda i: queries.catalogue_composition(i["catalogue"], "K"),
        ["src", "dst", "value"],
        True,
    ),
    "catalogue_mappings": (
        lambda i: queries.catalogue_mappings(i["catalogue"]),
        ["node_id", "circuit", "src_rank", "src_token", "src_text", "amplification", "rank"]
        + ["dst_token", "dst_text", "value"],
        True,
    ),
    "catalogue_history": (
        lambda i: queries.catalogue_history(i["model"], "induction", ["a1.h0", "a0.h0"]),
        ["step", "node_id", "value"],
        True,
    ),
    "agreement_with": (
        lambda i: queries.agreement_with(i["heads_run"], "node"),
        ["method", "params", "n", "spearman", "spearman_abs", "run_id"],
        True,
    ),
    "cross_recovery_options": (
        lambda i: queries.cross_recovery_options(i["model"]),
        ["method", "task_id"],
        True,
    ),
    "cross_recovery": (
        lambda i: queries.cross_recovery(i["model"], "eap", i["task"]),
        ["circuit_step", "at_step", "faithfulness"],
        True,
    ),
    "prompt_attention": (
        lambda i: queries.prompt_attention("p-none", 0, 0),
        ["query_pos", "key_pos", "weight"],
        False,
    ),
    "prompt_lens": (
        lambda i: queries.prompt_lens("p-none"),
        ["layer", "position", "top_token", "top_prob", "predicted_prob"],
        False,
    ),
    "prompt_dla": (lambda i: queries.prompt_dla("p-none"), ["node_id", "score"], False),
    "prompt_flow": (
        lambda i: queries.prompt_flow("p-none"),
        ["method", "layer", "position", "score"],
        False,
    ),
    "prompt_routes": (
        lambda i: queries.prompt_routes("p-none"),
        ["src_layer", "src_pos", "dst_layer", "dst_pos", "kind", "importance"],
        False,
    ),
}

SAE_DB_CASES: dict[str, Case] = {
    "sae_hooks": (lambda i: queries.sae_hooks(), ["sae_id", "hook"], True),
    "saes_of": (lambda i: queries.saes_of(i["model"]), [], True),  # saes.* + step, label
    "features_of": (
        lambda i: queries.features_of(i["sae"], flags=["alive", "dead", "dense"], order="feature"),
        ["feature", "density", "max_activation", "mean_activation", "dead", "dense"] + ["promotes"],
        True,
    ),
    "feature_stats": (lambda i: queries.feature_stats(i["sae"], i["feature"]), [], True),
    "feature_examples": (
        lambda i: queries.feature_examples(i["sae"], i["feature"]),
        ["rank", "tokens", "position", "activation"],
        True,
    ),
    "feature_attribution": (
        lambda i: queries.feature_attribution(i["sae"], i["feature"]),
        ["task_id", "checkpoint_id", "score"],
        True,
    ),
    "heads_writing_feature": (
        lambda i: queries.heads_writing_feature(i["sae"], i["head_feature"]),
        ["head", "score"],
        True,
    ),
    "features_written_by": (
        lambda i: queries.features_written_by(i["checkpoint"], i["writing_head"]),
        ["feature", "score"],
        True,
    ),
}


# queries of the attribution graph store (transcoders and one graph on the IOI zoo model)
GRAPH_DB_CASES: dict[str, Case] = {
    "graphs": (
        lambda i: queries.graphs(i["model"]),
        [
            "graph_id",
            "checkpoint_id",
            "step",
            "set_id",
            "text",
            "tokens",
            "params",
            "replacement_score",
            "completeness_score",
            "adjacency_path",
            "label",
        ],
        True,
    ),  # fmt: skip
    "graph_nodes": (
        lambda i: queries.graph_nodes(i["graph"]),
        [
            "node",
            "node_id",
            "kind",
            "layer",
            "position",
            "feature",
            "sae_id",
            "token",
            "activation",
            "probability",
            "influence",
            "cumulative_influence",
            "kept",
        ],
        True,
    ),  # fmt: skip
    "graph_edges": (lambda i: queries.graph_edges(i["graph"]), ["src", "dst", "weight"], True),
    "subgraphs_by_id": (
        lambda i: queries.subgraphs_by_id("sg-none"),
        ["subgraph_id", "name", "checkpoint_id", "source"],
        False,
    ),
}


SEEDS_DB_CASES: dict[str, Case] = {
    "seed_groups": (lambda i: queries.seed_groups(i["model"]), ["group_id", "members"], True),
    "seed_stability": (
        lambda i: queries.seed_stability(i["group"]),
        [
            "group_id",
            "task_id",
            "method",
            "step",
            "model_a",
            "model_b",
            "run_a",
            "run_b",
            "circuit_a",
            "circuit_b",
            "checkpoint_a",
            "checkpoint_b",
            "edges_a",
            "edges_b",
            "edges_shared",
            "edge_jaccard",
            "nodes_a",
            "nodes_b",
            "nodes_shared",
            "node_jaccard",
            "layer_jaccard",
            "n_scored",
            "spearman",
            "faithfulness_a",
            "faithfulness_b",
            "a_on_b",
            "b_on_a",
        ],
        True,
    ),  # fmt: skip
    "seed_circuit_edges": (
        lambda i: queries.seed_circuit_edges(i["circuits"]),
        ["src", "dst", "seeds", "score"],
        True,
    ),
}


@pytest.fixture(scope="module")
def heads_ids(heads_db: Path) -> dict:
    """Real arguments from the heads database: a model, runs of each kind, a circuit."""
    model = _one(heads_db, "SELECT model_id FROM models ORDER BY model_id")[0]
    heads_run, heads_method, task = _one(
        heads_db,
        "SELECT run_id, method, task_id FROM runs WHERE pipeline = 'heads' AND status = 'done'"
        " AND method = 'act_patch_denoise' ORDER BY run_id",
    )
    patching_run = _one(
        heads_db,
        "SELECT run_id FROM runs WHERE pipeline = 'patching' AND status = 'done' ORDER BY run_id",
    )[0]
    edge_run, checkpoint = _one(
        heads_db,
        "SELECT run_id, checkpoint_id FROM runs WHERE method = 'eap' AND status = 'done'"
        " ORDER BY run_id",
    )
    circuit = _one(heads_db, "SELECT circuit_id FROM circuits ORDER BY circuit_id")[0]
    two_circuits = _one(
        heads_db,
        "SELECT min(c.circuit_id), max(c.circuit_id) FROM circuits c JOIN runs r USING (run_id)"
        " WHERE r.method = 'eap'",
    )
    head = Node.head_of(1, 0).id
    catalogue = _one(heads_db, "SELECT catalogue_id FROM catalogues ORDER BY catalogue_id")[0]
    return {
        "catalogue": catalogue,
        "model": model,
        "heads_run": heads_run,
        "heads_method": heads_method,
        "task": task,
        "patching_run": patching_run,
        "edge_run": edge_run,
        "checkpoint": checkpoint,
        "circuit": circuit,
        "two_circuits": two_circuits,
        "head": head,
        "head_and_ports": [head] + [Node.head_of(1, 0, p).id for p in PORTS],
    }


@pytest.fixture(scope="module")
def sae_ids(sae_run) -> dict:
    """Real arguments from the SAE database: an SAE, its most attributed feature, and a head
    with the feature it writes most (sae_attr edges)."""
    db = sae_run.db
    model = _one(db, "SELECT model_id FROM models ORDER BY model_id")[0]
    sae, feature = _one(
        db,
        "SELECT n.sae_id, n.feature FROM node_scores s JOIN runs r USING (run_id)"
        " JOIN nodes n USING (node_id) WHERE r.method = 'sae_attr' AND n.kind = 'feature'"
        " ORDER BY abs(s.score) DESC LIMIT 1",
    )
    checkpoint, writing_head, head_feature = _one(
        db,
        "SELECT r.checkpoint_id, e.src, n.feature FROM edges e JOIN runs r USING (run_id)"
        " JOIN nodes n ON n.node_id = e.dst"
        " JOIN nodes h ON h.node_id = e.src"
        " WHERE r.method = 'sae_attr' AND h.kind = 'attn_head' AND n.kind = 'feature'"
        " AND n.sae_id = ? ORDER BY abs(e.score) DESC LIMIT 1",
        [sae],
    )
    return {
        "db": db,
        "model": model,
        "sae": sae,
        "feature": int(feature),
        "checkpoint": checkpoint,
        "writing_head": writing_head,
        "head_feature": int(head_feature),
    }


def test_every_public_query_is_covered():
    cases = set(HEADS_DB_CASES) | set(SAE_DB_CASES) | set(GRAPH_DB_CASES) | set(SEEDS_DB_CASES)
    cases |= set(WHY_DB_CASES)
    assert _public() == cases
    assert all(inspect.getdoc(getattr(queries, n)) for n in _public())


@pytest.mark.parametrize("name", sorted(HEADS_DB_CASES))
def test_query_on_heads_db(name, heads_db, heads_ids, monkeypatch):
    _use(heads_db, monkeypatch)
    call, columns, non_empty = HEADS_DB_CASES[name]
    frame = call(heads_ids)
    assert isinstance(frame, pd.DataFrame)
    assert list(frame.columns) == columns
    assert not (non_empty and frame.empty), f"{name} returned no rows"


@pytest.mark.parametrize("name", sorted(SAE_DB_CASES))
def test_query_on_sae_db(name, sae_ids, monkeypatch):
    db = sae_ids["db"]
    _use(db, monkeypatch)
    call, columns, non_empty = SAE_DB_CASES[name]
    expected = {
        "saes_of": _columns(db, "saes") + ["step", "label"],
        "feature_stats": _columns(db, "features"),
    }.get(name, columns)
    frame = call(sae_ids)
    assert isinstance(frame, pd.DataFrame)
    assert list(frame.columns) == expected
    assert not (non_empty and frame.empty), f"{name} returned no rows"


@pytest.mark.parametrize("name", sorted(GRAPH_DB_CASES))
def test_query_on_graph_db(name, graph_store, monkeypatch):
    _use(graph_store.db, monkeypatch)
    model = _one(graph_store.db, "SELECT model_id FROM models")[0]
    call, columns, non_empty = GRAPH_DB_CASES[name]
    frame = call({"model": model, "graph": graph_store.graph_id})
    assert isinstance(frame, pd.DataFrame)
    assert set(columns) <= set(frame.columns)
    if non_empty:
        assert not frame.empty


@pytest.mark.parametrize("name", sorted(SEEDS_DB_CASES))
def test_query_on_seeds_db(name, seeds_db, monkeypatch):
    _use(seeds_db, monkeypatch)
    group, model = _one(seeds_db, "SELECT group_id, model_id FROM seed_groups ORDER BY ALL")
    circuits = list(_one(seeds_db, "SELECT circuit_a, circuit_b FROM seed_stability"))
    call, columns, non_empty = SEEDS_DB_CASES[name]
    frame = call({"group": group, "model": model, "circuits": circuits})
    assert list(frame.columns) == columns
    assert not (non_empty and frame.empty), f"{name} returned no rows"


WHY_DB_CASES: dict[str, Case] = {
    "prompt_explanations": (
        lambda i: queries.prompt_explanations(i["prompt"]),
        ["explanation_id", "target_id", "target", "target_logit", "target_prob",
         "baseline_logit", "top_k", "params", "label"],
        True,
    ),
    "explanation_scores": (
        lambda i: queries.explanation_scores(i["explanation"]),
        ["method", "position", "score"],
        True,
    ),
    "explanation_layers": (
        lambda i: queries.explanation_layers(i["explanation"]),
        ["method", "layer", "position", "score"],
        True,
    ),
    "explanation_methods": (
        lambda i: queries.explanation_methods(i["explanation"]),
        ["method", "deletion_auc", "insertion_auc", "deletion_logit_auc", "insertion_logit_auc",
         "total", "delta", "seconds"],
        True,
    ),
    "explanation_curves": (
        lambda i: queries.explanation_curves(i["explanation"]),
        ["method", "kind", "k", "prob", "logit"],
        True,
    ),
    "explanation_agreement": (
        lambda i: queries.explanation_agreement(i["explanation"]),
        ["method_a", "method_b", "spearman", "top_k_share"],
        True,
    ),
    "prompt_tuned_lens": (
        lambda i: queries.prompt_tuned_lens(i["prompt"]),
        ["lens_id", "layer", "position", "top_token", "top_prob", "predicted_prob"],
        True,
    ),
    "prompt_patchscope": (
        lambda i: queries.prompt_patchscope(i["prompt"]),
        ["source_layer", "target_layer", "text", "token_ids", "template", "source_position",
         "inspector_id"],
        True,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(WHY_DB_CASES))
def test_query_on_why_db(name, why_db, monkeypatch):
    db, _ = why_db
    _use(db, monkeypatch)
    prompt, explanation = _one(db, "SELECT prompt_id, explanation_id FROM prompt_explanations")
    call, columns, non_empty = WHY_DB_CASES[name]
    frame = call({"prompt": prompt, "explanation": explanation})
    assert list(frame.columns) == columns
    assert not (non_empty and frame.empty), f"{name} returned no rows"


def test_query_results_follow_their_arguments(heads_db, heads_ids, monkeypatch):
    _use(heads_db, monkeypatch)
    top = queries.edge_run_edges_top(heads_ids["edge_run"], 3)
    assert len(top) == 3 and top["score"].abs().is_monotonic_decreasing
    bound = float(queries.edge_run_size(heads_ids["edge_run"])["m"][0])
    above = queries.edge_run_edges_above(heads_ids["edge_run"], bound / 2, 100)
    assert len(above) >= 1 and (above["score"].abs() >= bound / 2).all()
    assert len(queries.edge_run_edges_above(heads_ids["edge_run"], 0.0, 2)) == 2
    scores = queries.node_scores_at_checkpoint(heads_ids["checkpoint"], heads_ids["head_and_ports"])
    assert set(scores["node_id"]) <= set(heads_ids["head_and_ports"])
    with pytest.raises(ValueError):
        queries.features_of("any", order="score; DROP TABLE runs")
    with pytest.raises(ValueError):
        queries.features_of("any", flags=["alive", "1=1"])


def test_cumulative_share_keeps_the_fewest_strongest_edges_reaching_it(
    heads_db, heads_ids, monkeypatch
):
    """Against the definition computed here: sort by |score|, keep edges until their running
    sum reaches the share of the total (the edge that crosses it included); all of them at 1."""
    _use(heads_db, monkeypatch)
    run = heads_ids["edge_run"]
    (n,) = _one(heads_db, "SELECT count(*) FROM edges WHERE run_id = ?", [run])
    every = queries.edge_run_edges_top(run, n)
    every = every[every["score"] != 0].reset_index(drop=True)  # no share, never kept
    sizes = every["score"].abs().tolist()
    total = sum(sizes)
    for share in (0.1, 0.5, 0.9):  # (no partial sum lies within rounding of these)
        running, expected = 0.0, 0
        while running < share * total:
            running += sizes[expected]
            expected += 1
        kept = queries.edge_run_edges_share(run, share, n)
        assert len(kept) == expected, share
        assert kept.equals(every.head(expected))
    # share 1: every edge whose |score| is not lost in the rounding of the total, in order
    kept = queries.edge_run_edges_share(run, 1.0, n)
    assert kept.equals(every.head(len(kept)))
    assert len(kept) >= sum(size > 1e-12 * total for size in sizes)
    assert len(queries.edge_run_edges_share(run, 1.0, 3)) == 3  # the cap


SQL_WORDS = ("SELECT ", "FROM ", " WHERE ", " JOIN ", "ORDER BY", "GROUP BY", "INSERT ")
SQL_HOMES = {"queries.py", "data.py"}


def _strings(tree: ast.AST, skip: set[ast.AST]) -> list[str]:
    """Every string literal in a module (f-string parts included), but those under `skip`."""
    skipped = {id(n) for s in skip for n in ast.walk(s)}
    return [
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in skipped
    ]


def test_sql_lives_only_in_the_read_layer():
    """No app module but queries.py and data.py holds SQL; the SQL console only its examples
    (text shown to the user) and runs the user's own query."""
    offenders = []
    for path in sorted(APP_DIR.rglob("*.py")):
        if path.name in SQL_HOMES:
            continue
        tree = ast.parse(path.read_text())
        skip: set[ast.AST] = set()
        if path.name == "sql_console.py":
            skip = {
                node.value
                for node in tree.body
                if isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "EXAMPLES" for t in node.targets)
            }
            assert skip, "the SQL console's EXAMPLES moved: update this test"
        for text in _strings(tree, skip):
            hits = [w for w in SQL_WORDS if w in text]
            if hits:
                offenders.append(f"{path.relative_to(APP_DIR)}: {hits} in {text[:60]!r}")
    assert not offenders, "\n".join(offenders)
    # the views run no SQL of their own: only the console calls the executor directly
    callers = [
        p.name
        for p in sorted((APP_DIR / "views").glob("*.py"))
        if "query(" in p.read_text() or "workbench.app.data" in p.read_text()
    ]
    assert callers == ["sql_console.py"]


def test_the_sql_scan_sees_sql():
    """The scan is not blind: it finds the read layer's own SQL and a query in an f-string."""
    tree = ast.parse((APP_DIR / "queries.py").read_text())
    assert any("SELECT " in s for s in _strings(tree, set()))
    snippet = ast.parse('x = f"SELECT a FROM t WHERE b = {c}"')
    assert any("SELECT " in s for s in _strings(snippet, set()))
