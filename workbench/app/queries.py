"""The app's read layer: one named query per thing a view shows.

Every SQL string of the app lives here (except the SQL console's user-editable examples); each
function runs its query through `app.data.query`, the single cached, read-only executor, and
returns a DataFrame. Node ids are built and read only through `workbench.core.Node`; where a
query must pick nodes by kind it filters on the `nodes` table's columns.
"""

from collections.abc import Iterable

import pandas as pd

from workbench.app import data
from workbench.core import Node

# -- models, checkpoints, runs -------------------------------------------------------------


def models() -> pd.DataFrame:
    """Every stored model (id, architecture, shape), by id: the model selectors' options."""
    return data.query(
        "SELECT model_id, architecture, n_layers, n_heads FROM models ORDER BY model_id"
    )


def model_table() -> pd.DataFrame:
    """Every stored model with its dimensions and source, as the overview lists them."""
    return data.query(
        "SELECT model_id, architecture, n_layers, n_heads, d_model, d_vocab, source FROM models"
    )


def model_shape(model_id: str) -> pd.DataFrame:
    """One model's number of layers and of heads per layer."""
    return data.query("SELECT n_layers, n_heads FROM models WHERE model_id = ?", (model_id,))


def store_counts() -> pd.DataFrame:
    """One row: how many models, checkpoints, tasks, done and failed runs the store holds."""
    return data.query(
        """SELECT (SELECT count(*) FROM models) AS models,
                  (SELECT count(*) FROM checkpoints) AS checkpoints,
                  (SELECT count(*) FROM tasks) AS tasks,
                  (SELECT count(*) FROM runs WHERE status = 'done') AS runs_done,
                  (SELECT count(*) FROM runs WHERE status = 'failed') AS runs_failed"""
    )


def checkpoints() -> pd.DataFrame:
    """Every stored checkpoint, by model and training step."""
    return data.query(
        "SELECT checkpoint_id, model_id, step, path, registered_at FROM checkpoints "
        "ORDER BY model_id, step"
    )


def recent_runs(limit: int = 500) -> pd.DataFrame:
    """The most recently finished runs of any status, newest first."""
    return data.query(
        """SELECT run_id, pipeline, method, checkpoint_id, task_id, status, error,
                  metric_clean, metric_corrupt, finished_at
           FROM runs ORDER BY finished_at DESC LIMIT ?""",
        (limit,),
    )


def done_runs(model_id: str) -> pd.DataFrame:
    """A model's finished runs with their checkpoint step and metrics, by method and step (the
    newest first among runs of a method at one step: the one a picker shows), and the
    integrated-gradients rule of those that have one."""
    return data.query(
        """SELECT r.run_id, r.pipeline, r.method, r.task_id, c.step, r.checkpoint_id,
                  r.metric_clean, r.metric_corrupt, r.params->>'ig_rule' AS ig_rule
           FROM runs r JOIN checkpoints c USING (checkpoint_id)
           WHERE c.model_id = ? AND r.status = 'done'
           ORDER BY r.method, c.step, r.finished_at DESC, r.run_id""",
        (model_id,),
    )


def patching_runs(model_id: str) -> pd.DataFrame:
    """A model's finished patching runs with their component, positions and ablation."""
    return data.query(
        """SELECT r.run_id, r.method, r.task_id, c.step,
                  json_extract_string(r.params, '$.component') AS component,
                  json_extract_string(r.params, '$.positions') AS positions,
                  json_extract_string(r.params, '$.ablation') AS ablation
           FROM runs r JOIN checkpoints c USING (checkpoint_id)
           WHERE c.model_id = ? AND r.pipeline = 'patching' AND r.status = 'done'""",
        (model_id,),
    )


def run_metrics(run_id: str) -> pd.DataFrame:
    """The extra metrics a run measured (name and value)."""
    return data.query(
        "SELECT metric, value FROM run_metrics WHERE run_id = ? ORDER BY metric", (run_id,)
    )


def spot_check(run_id: str) -> pd.DataFrame:
    """A run's spot check: each item checked (a node, or an edge `src -> dst`), the draw it
    came from, the method's estimate, the exact score, and their difference."""
    return data.query(
        """SELECT coalesce(node_id, src || ' -> ' || dst) AS item, sample, estimate, exact,
                  estimate - exact AS difference
           FROM spot_checks WHERE run_id = ?
           ORDER BY sample DESC, abs(estimate) DESC, item""",
        (run_id,),
    )


# -- node scores ---------------------------------------------------------------------------


def head_scores(run_id: str) -> pd.DataFrame:
    """A run's whole-head scores (all positions at once) with each head's layer and index, and
    their standard errors over prompts (NULL where the run has none)."""
    return data.query(
        """SELECT n.layer, n.head, s.score, s.stderr, s.node_id AS head_id FROM node_scores s
           JOIN runs r USING (run_id) JOIN checkpoints c USING (checkpoint_id)
           JOIN nodes n ON n.model_id = c.model_id AND n.node_id = s.node_id
           WHERE s.run_id = ? AND n.kind = 'attn_head' AND n.port IS NULL
             AND s.position IS NULL""",
        (run_id,),
    )


def head_score_history(model_id: str, method: str, task_id: str) -> pd.DataFrame:
    """Every head's whole-head score under one method and task at each checkpoint (its newest
    run there), by step."""
    return data.query(
        """SELECT c.step, s.node_id, s.score FROM node_scores s
           JOIN runs r USING (run_id) JOIN checkpoints c USING (checkpoint_id)
           JOIN nodes n ON n.model_id = c.model_id AND n.node_id = s.node_id
           WHERE c.model_id = ? AND r.method = ? AND r.task_id = ? AND r.status = 'done'
             AND s.position IS NULL AND n.kind = 'attn_head' AND n.port IS NULL
           QUALIFY dense_rank() OVER (PARTITION BY c.step
                                      ORDER BY r.finished_at DESC, r.run_id) = 1
           ORDER BY c.step""",
        (model_id, method, task_id),
    )


def agreement_with(run_id: str, kind: str) -> pd.DataFrame:
    """How each other run at the same checkpoint and task ranks what `run_id` scored (`kind`:
    node or edge): its method and params, the items both scored, Spearman's rank correlation
    of their scores and of their magnitudes (`method_agreement`)."""
    return data.query(
        """SELECT r.method, r.params, a.n, a.spearman, a.spearman_abs, r.run_id
           FROM method_agreement a
           JOIN runs r ON r.run_id = CASE WHEN a.run_a = ? THEN a.run_b ELSE a.run_a END
           WHERE ? IN (a.run_a, a.run_b) AND a.kind = ?
           ORDER BY a.spearman_abs DESC NULLS LAST""",
        (run_id, run_id, kind),
    )


def cross_recovery_options(model_id: str) -> pd.DataFrame:
    """The (method, task) pairs whose circuits have cross-recovery rows on this model."""
    return data.query(
        """SELECT DISTINCT r.method, x.task_id FROM cross_recovery x
           JOIN circuits c USING (circuit_id) JOIN runs r USING (run_id)
           JOIN checkpoints k ON k.checkpoint_id = x.checkpoint_id
           JOIN checkpoints own ON own.checkpoint_id = r.checkpoint_id
           WHERE k.model_id = ? AND own.model_id = k.model_id
           ORDER BY r.method, x.task_id""",
        (model_id,),
    )


def cross_recovery(model_id: str, method: str, task_id: str) -> pd.DataFrame:
    """Each stored circuit of `method` on `task_id` (by its checkpoint's step) evaluated at each
    checkpoint (by step): circuit_step, at_step, faithfulness (newest row of each)."""
    return data.query(
        """SELECT ka.step AS circuit_step, kb.step AS at_step, x.faithfulness
           FROM cross_recovery x JOIN circuits c USING (circuit_id) JOIN runs r USING (run_id)
           JOIN checkpoints ka ON ka.checkpoint_id = r.checkpoint_id
           JOIN checkpoints kb ON kb.checkpoint_id = x.checkpoint_id
           WHERE kb.model_id = ? AND ka.model_id = kb.model_id AND r.method = ?
             AND x.task_id = ?
           QUALIFY row_number() OVER (
             PARTITION BY ka.step, kb.step ORDER BY x.created_at DESC) = 1
           ORDER BY circuit_step, at_step""",
        (model_id, method, task_id),
    )


# -- stability over seeds ------------------------------------------------------------------


def seed_groups(model_id: str) -> pd.DataFrame:
    """The seed groups this model is a member of, with their members' count."""
    return data.query(
        """SELECT group_id, count(*) AS members FROM seed_groups
           WHERE group_id IN (SELECT group_id FROM seed_groups WHERE model_id = ?)
           GROUP BY group_id ORDER BY group_id""",
        (model_id,),
    )


def seed_stability(group_id: str) -> pd.DataFrame:
    """The group's rows of the view `seed_stability`, by task, method, step and pair."""
    return data.query(
        """SELECT * FROM seed_stability WHERE group_id = ?
           ORDER BY task_id, method, step, model_a, model_b""",
        (group_id,),
    )


def seed_circuit_edges(circuit_ids: list[str]) -> pd.DataFrame:
    """Every edge of the circuits: src, dst, how many of them hold it (`seeds`) and its mean
    score over those."""
    return data.query(
        """SELECT src, dst, count(DISTINCT circuit_id) AS seeds, avg(score) AS score
           FROM circuit_edges WHERE list_contains(?, circuit_id)
           GROUP BY src, dst ORDER BY seeds DESC, abs(avg(score)) DESC""",
        (circuit_ids,),
    )


# -- head catalogue ------------------------------------------------------------------------


def catalogues(model_id: str) -> pd.DataFrame:
    """The newest head catalogue of each of the model's checkpoints, by step."""
    return data.query(
        """SELECT k.catalogue_id, k.checkpoint_id, c.step, k.params, k.seconds, k.created_at
           FROM catalogues k JOIN checkpoints c USING (checkpoint_id)
           WHERE c.model_id = ?
           QUALIFY row_number() OVER (PARTITION BY k.checkpoint_id ORDER BY k.created_at DESC) = 1
           ORDER BY c.step""",
        (model_id,),
    )


def catalogue_scores(catalogue_id: str) -> pd.DataFrame:
    """A catalogue's head scores: node_id, layer, head, score (its name), value."""
    return data.query(
        """SELECT node_id, layer, head, score, value FROM head_catalogue
           WHERE catalogue_id = ? ORDER BY score, layer, head""",
        (catalogue_id,),
    )


def catalogue_composition(catalogue_id: str, mode: str) -> pd.DataFrame:
    """A catalogue's Q-, K- or V-composition scores (`mode`): src, dst, value."""
    return data.query(
        """SELECT src, dst, value FROM head_composition
           WHERE catalogue_id = ? AND mode = ? ORDER BY value DESC""",
        (catalogue_id, mode),
    )


def catalogue_mappings(catalogue_id: str) -> pd.DataFrame:
    """Every head's top token mappings in a catalogue (both circuits, by rank)."""
    return data.query(
        """SELECT node_id, circuit, src_rank, src_token, src_text, amplification, rank,
                  dst_token, dst_text, value
           FROM head_mappings WHERE catalogue_id = ?
           ORDER BY node_id, circuit, src_rank, rank""",
        (catalogue_id,),
    )


def catalogue_history(model_id: str, score: str, node_ids: list[str]) -> pd.DataFrame:
    """One catalogue score of the given heads at each checkpoint (its newest catalogue)."""
    return data.query(
        """WITH newest AS (
             SELECT k.catalogue_id, c.step FROM catalogues k JOIN checkpoints c
             USING (checkpoint_id) WHERE c.model_id = ?
             QUALIFY row_number() OVER (PARTITION BY k.checkpoint_id
                                        ORDER BY k.created_at DESC) = 1)
           SELECT n.step, h.node_id, h.value FROM head_catalogue h JOIN newest n
           USING (catalogue_id) WHERE h.score = ? AND list_contains(?, h.node_id)
           ORDER BY n.step, h.node_id""",
        (model_id, score, list(node_ids)),
    )


def patching_scores(run_id: str) -> pd.DataFrame:
    """A run's node scores (position -1 = all positions at once), by layer, head, position."""
    return data.query(
        """SELECT s.node_id, coalesce(s.position, -1) AS position, s.score, n.layer, n.head
           FROM node_scores s JOIN runs r USING (run_id) JOIN checkpoints c USING (checkpoint_id)
           JOIN nodes n ON n.model_id = c.model_id AND n.node_id = s.node_id
           WHERE s.run_id = ? ORDER BY n.layer, n.head, s.position""",
        (run_id,),
    )


def node_scores_at_checkpoint(checkpoint_id: str, node_ids: list[str]) -> pd.DataFrame:
    """Every finished run's scores of the given nodes at one checkpoint, across methods."""
    return data.query(
        """SELECT r.pipeline, r.method, json_extract_string(r.params, '$.component') AS component,
                  s.node_id, s.position, s.score
           FROM node_scores s JOIN runs r USING (run_id)
           JOIN checkpoints c USING (checkpoint_id)
           JOIN nodes n ON n.model_id = c.model_id AND n.node_id = s.node_id
           WHERE r.checkpoint_id = ? AND r.status = 'done' AND list_contains(?, n.node_id)
           ORDER BY r.pipeline, r.method, s.node_id, s.position""",
        (checkpoint_id, list(node_ids)),
    )


# -- edges and circuits --------------------------------------------------------------------


def runs_with_edges(model_id: str) -> pd.DataFrame:
    """The ids of a model's runs that stored edges."""
    return data.query(
        """SELECT DISTINCT e.run_id FROM edges e JOIN runs r USING (run_id)
           JOIN checkpoints c USING (checkpoint_id) WHERE c.model_id = ?""",
        (model_id,),
    )


def run_info(run_id: str) -> pd.DataFrame:
    """One row (or none): a run's model, method, task and checkpoint step."""
    return data.query(
        """SELECT c.model_id, r.method, r.task_id, c.step, r.pipeline
           FROM runs r JOIN checkpoints c USING (checkpoint_id) WHERE r.run_id = ?""",
        (run_id,),
    )


def edge_run_size(run_id: str) -> pd.DataFrame:
    """One row: `n`, a run's number of edges, and `m`, their largest |score|."""
    return data.query(
        "SELECT count(*) AS n, max(abs(score)) AS m FROM edges WHERE run_id = ?", (run_id,)
    )


def edge_run_edges_top(run_id: str, k: int) -> pd.DataFrame:
    """A run's k edges of largest |score|, strongest first (ties by src, dst)."""
    return data.query(
        "SELECT src, dst, score, stderr FROM edges WHERE run_id = ? "
        "ORDER BY abs(score) DESC, src, dst LIMIT ?",
        (run_id, k),
    )


def edge_run_edges_above(run_id: str, threshold: float, limit: int) -> pd.DataFrame:
    """A run's edges with |score| at least `threshold`, strongest first, at most `limit`."""
    return data.query(
        "SELECT src, dst, score, stderr FROM edges WHERE run_id = ? AND abs(score) >= ? "
        "ORDER BY abs(score) DESC, src, dst LIMIT ?",
        (run_id, threshold, limit),
    )


def edge_run_edges_share(run_id: str, share: float, limit: int) -> pd.DataFrame:
    """The strongest edges of a run that together carry `share` of its total |score| (as
    circuit-tracer prunes by cumulative influence): edges by |score|, descending, up to and
    including the one at which the running sum reaches `share` of the total; at most `limit`.
    Edges of score 0 carry no share and are never kept."""
    return data.query(
        """WITH ranked AS (
             SELECT src, dst, score, stderr,
                    sum(abs(score)) OVER (ORDER BY abs(score) DESC, src, dst
                                          ROWS UNBOUNDED PRECEDING) - abs(score) AS before,
                    sum(abs(score)) OVER () AS total
             FROM edges WHERE run_id = ? AND score <> 0)
           SELECT src, dst, score, stderr FROM ranked WHERE before < ? * total
           ORDER BY abs(score) DESC, src, dst LIMIT ?""",
        (run_id, share, limit),
    )


def faithfulness_curve(run_id: str) -> pd.DataFrame:
    """A run's faithfulness as a function of circuit size (number of edges kept)."""
    return data.query(
        "SELECT n_edges, faithfulness FROM faithfulness_curves WHERE run_id = ? ORDER BY n_edges",
        (run_id,),
    )


def circuits(model_id: str) -> pd.DataFrame:
    """A model's stored circuits with their run, step and a display label (with the
    integrated-gradients rule of a run that has one), newest step first."""
    return data.query(
        """SELECT c.circuit_id, c.name, c.rule, c.n_edges, c.faithfulness, r.method,
                  r.checkpoint_id, ck.step, r.task_id,
                  r.method || ' @ step ' || ck.step
                    || coalesce(' · IG ' || (r.params->>'ig_rule'), '') || ' · ' || c.rule
                    || ' · faithfulness ' || round(c.faithfulness, 2) AS label
           FROM circuits c JOIN runs r USING (run_id) JOIN checkpoints ck USING (checkpoint_id)
           WHERE ck.model_id = ? ORDER BY ck.step DESC, r.method""",
        (model_id,),
    )


def circuit_edges(circuit_id: str) -> pd.DataFrame:
    """A stored circuit's edges, strongest |score| first."""
    return data.query(
        "SELECT src, dst, score FROM circuit_edges WHERE circuit_id = ? ORDER BY abs(score) DESC",
        (circuit_id,),
    )


def incident_edges(checkpoint_id: str, src: str, dst_ids: list[str]) -> pd.DataFrame:
    """The 50 strongest edges of finished runs at a checkpoint from `src` or into `dst_ids`."""
    return data.query(
        """SELECT r.method, e.src, e.dst, e.score FROM edges e JOIN runs r USING (run_id)
           WHERE r.checkpoint_id = ? AND r.status = 'done'
             AND (e.src = ? OR list_contains(?, e.dst))
           ORDER BY abs(e.score) DESC LIMIT 50""",
        (checkpoint_id, src, list(dst_ids)),
    )


def features_written_by(checkpoint_id: str, node_id: str) -> pd.DataFrame:
    """The 5 SAE features a node writes most into (sae_attr edges) at a checkpoint."""
    return data.query(
        """SELECT e.dst AS feature, e.score FROM edges e JOIN runs r USING (run_id)
           JOIN checkpoints c USING (checkpoint_id)
           JOIN nodes n ON n.model_id = c.model_id AND n.node_id = e.dst
           WHERE r.checkpoint_id = ? AND r.method = 'sae_attr' AND r.status = 'done'
             AND e.src = ? AND n.kind = 'feature'
           ORDER BY abs(e.score) DESC LIMIT 5""",
        (checkpoint_id, node_id),
    )


# -- SAEs and features ---------------------------------------------------------------------


def sae_hooks() -> pd.DataFrame:
    """Every stored SAE's id and the hook it reads."""
    return data.query("SELECT sae_id, hook FROM saes")


def saes_of(model_id: str) -> pd.DataFrame:
    """A model's SAEs (every saes column, the checkpoint step and a label), newest step first."""
    return data.query(
        """SELECT s.*, c.step, s.hook || ' · ' || s.architecture || ' · ' || s.d_sae
                  || ' features · step ' || c.step || ' · ' || s.sae_id AS label
           FROM saes s JOIN checkpoints c USING (checkpoint_id)
           WHERE c.model_id = ? ORDER BY c.step DESC, s.hook""",
        (model_id,),
    )


FEATURE_ORDERS = ("max_activation", "density", "feature")
FEATURE_FLAGS = {
    "alive": "(NOT dead AND NOT dense)",
    "dead": "dead",
    "dense": "dense",
}


def features_of(
    sae_id: str,
    *,
    text: str = "",
    flags: Iterable[str] = ("alive",),
    order: str = "max_activation",
    limit: int = 200,
) -> pd.DataFrame:
    """An SAE's features with the given flags whose top logits contain `text`, ordered."""
    if order not in FEATURE_ORDERS:
        raise ValueError(f"order must be one of {', '.join(FEATURE_ORDERS)}, not {order!r}")
    chosen = list(flags)
    unknown = [f for f in chosen if f not in FEATURE_FLAGS]
    if unknown:
        raise ValueError(f"unknown feature flags {unknown} (known: {', '.join(FEATURE_FLAGS)})")
    conditions = ["sae_id = ?"]
    params: list = [sae_id]
    if text:
        conditions.append("lower(top_logits) LIKE ?")
        params.append(f"%{text.lower()}%")
    shown = [FEATURE_FLAGS[f] for f in FEATURE_FLAGS if f in chosen]
    conditions.append("(" + (" OR ".join(shown) or "false") + ")")
    direction = "ASC" if order == "feature" else "DESC"
    params.append(limit)
    return data.query(
        f"""SELECT feature, density, max_activation, mean_activation, dead, dense,
                   list_transform(from_json(top_logits, '["json"]')[1:5],
                                  lambda x: x->>'token') AS promotes
            FROM features WHERE {" AND ".join(conditions)}
            ORDER BY {order} {direction} LIMIT ?""",
        tuple(params),
    )


def feature_stats(sae_id: str, feature: int) -> pd.DataFrame:
    """One feature's stored statistics (every features column); empty if it has none."""
    return data.query("SELECT * FROM features WHERE sae_id = ? AND feature = ?", (sae_id, feature))


def feature_examples(sae_id: str, feature: int) -> pd.DataFrame:
    """A feature's top activating contexts (tokens, the activating position), by rank."""
    return data.query(
        """SELECT rank, tokens, position, activation FROM feature_examples
           WHERE sae_id = ? AND feature = ? ORDER BY rank""",
        (sae_id, feature),
    )


def feature_attribution(sae_id: str, feature: int) -> pd.DataFrame:
    """A feature's score in every finished sae_attr run, largest |score| first."""
    return data.query(
        """SELECT r.task_id, r.checkpoint_id, s.score FROM node_scores s JOIN runs r USING (run_id)
           WHERE s.node_id = ? AND r.method = 'sae_attr' AND r.status = 'done'
           ORDER BY abs(s.score) DESC""",
        (Node.sae_feature(sae_id, feature).id,),
    )


def heads_writing_feature(sae_id: str, feature: int) -> pd.DataFrame:
    """The 10 heads writing most into a feature (sae_attr edges), largest |score| first."""
    return data.query(
        """SELECT e.src AS head, e.score FROM edges e JOIN runs r USING (run_id)
           JOIN checkpoints c USING (checkpoint_id)
           JOIN nodes n ON n.model_id = c.model_id AND n.node_id = e.src
           WHERE e.dst = ? AND n.kind = 'attn_head' AND r.method = 'sae_attr'
             AND r.status = 'done'
           ORDER BY abs(e.score) DESC LIMIT 10""",
        (Node.sae_feature(sae_id, feature).id,),
    )


# -- work in progress and circuits across training ------------------------------------------


def run_queue() -> pd.DataFrame:
    """What runners are doing: running jobs first (with their heartbeat), then the queue."""
    return data.query(
        """SELECT status, pipeline, method, checkpoint_id, task, run_id, pid, host,
                  started_at, heartbeat_at, queued_at
           FROM run_queue_live ORDER BY status = 'running' DESC, queued_at, job_id"""
    )


def loss_curve(model_id: str) -> pd.DataFrame:
    """The training loss at each checkpoint of a model that logged one."""
    return data.query(
        """SELECT step, train_loss FROM checkpoints
           WHERE model_id = ? AND train_loss IS NOT NULL ORDER BY step""",
        (model_id,),
    )


def timeline_methods(model_id: str) -> pd.DataFrame:
    """(pipeline, method, task) with head scores at two or more checkpoints of a model."""
    return data.query(
        """SELECT t.pipeline, t.method, t.task_id, count(DISTINCT t.step) AS steps
           FROM node_timeline t JOIN nodes n USING (model_id, node_id)
           WHERE t.model_id = ? AND n.kind = 'attn_head' AND n.port IS NULL
             AND t.position IS NULL
           GROUP BY ALL HAVING count(DISTINCT t.step) >= 2 ORDER BY ALL""",
        (model_id,),
    )


def head_timeline(model_id: str, pipeline: str, method: str, task_id: str) -> pd.DataFrame:
    """Every head's all-positions score at every checkpoint, for one method and task."""
    return data.query(
        """SELECT t.node_id, n.layer, n.head, t.step, t.score
           FROM node_timeline t JOIN nodes n USING (model_id, node_id)
           WHERE t.model_id = ? AND t.pipeline = ? AND t.method = ? AND t.task_id = ?
             AND n.kind = 'attn_head' AND n.port IS NULL AND t.position IS NULL
           ORDER BY n.layer, n.head, t.step""",
        (model_id, pipeline, method, task_id),
    )


def head_formation_steps(model_id: str, pipeline: str, method: str, task_id: str) -> pd.DataFrame:
    """Formation steps (`formation_steps` view) of the heads, for one method and task."""
    return data.query(
        """SELECT f.node_id, f.formation_step, f.peak
           FROM formation_steps f JOIN nodes n USING (model_id, node_id)
           WHERE f.model_id = ? AND f.pipeline = ? AND f.method = ? AND f.task_id = ?
             AND n.kind = 'attn_head' AND n.port IS NULL
           ORDER BY f.formation_step NULLS LAST, f.peak DESC""",
        (model_id, pipeline, method, task_id),
    )


def circuits_by_step(model_id: str) -> pd.DataFrame:
    """Each stored circuit of a model with its run's method, task and checkpoint step (the
    newest run's first at a step), its faithfulness and that faithfulness's bootstrap interval
    (NULL for runs stored before it was kept)."""
    return data.query(
        """SELECT ci.circuit_id, r.method, r.task_id, ck.step, ci.n_edges, ci.faithfulness,
                  lo.value AS faithfulness_lo, hi.value AS faithfulness_hi
           FROM circuits ci JOIN runs r USING (run_id) JOIN checkpoints ck USING (checkpoint_id)
           LEFT JOIN run_metrics lo ON lo.run_id = r.run_id AND lo.metric = 'faithfulness_lo'
           LEFT JOIN run_metrics hi ON hi.run_id = r.run_id AND hi.metric = 'faithfulness_hi'
           WHERE ck.model_id = ? ORDER BY r.method, r.task_id, ck.step, r.finished_at DESC""",
        (model_id,),
    )


def circuit_diff(circuit_a: str, circuit_b: str) -> pd.DataFrame:
    """The `circuit_diff` macro: edges added, removed and kept from circuit a to b."""
    return data.query(
        "SELECT * FROM circuit_diff(?, ?) ORDER BY status, src, dst", (circuit_a, circuit_b)
    )


def node_curves(model_id: str, node_id: str) -> pd.DataFrame:
    """One node's all-positions score at every checkpoint, for every method and task, with its
    standard error over prompts (NULL where the method has none)."""
    return data.query(
        """SELECT pipeline || ' / ' || method || ' · ' || task_id AS series, step, score, stderr
           FROM node_timeline
           WHERE model_id = ? AND node_id = ? AND position IS NULL
           ORDER BY series, step""",
        (model_id, node_id),
    )


# -- curated subgraphs ----------------------------------------------------------------------


def subgraphs(model_id: str) -> pd.DataFrame:
    """A model's saved subgraphs, newest first, with a display label."""
    return data.query(
        """SELECT s.subgraph_id, s.name, s.checkpoint_id, ck.step, s.source, s.n_nodes,
                  s.n_edges, s.saved_at,
                  s.name || ' · step ' || ck.step || ' · ' || s.n_nodes || ' nodes' AS label
           FROM subgraphs s JOIN checkpoints ck USING (checkpoint_id)
           WHERE s.model_id = ? ORDER BY s.saved_at DESC, s.name""",
        (model_id,),
    )


def subgraphs_by_id(subgraph_id: str) -> pd.DataFrame:
    """One saved subgraph's row (empty if there is none)."""
    return data.query(
        "SELECT subgraph_id, name, checkpoint_id, source FROM subgraphs WHERE subgraph_id = ?",
        (subgraph_id,),
    )


def subgraph_nodes(subgraph_id: str) -> pd.DataFrame:
    """A subgraph's nodes with their group (supernode) label and note."""
    return data.query(
        "SELECT node_id, group_label, note FROM subgraph_nodes WHERE subgraph_id = ? "
        "ORDER BY node_id",
        (subgraph_id,),
    )


def subgraph_edges(subgraph_id: str) -> pd.DataFrame:
    """A subgraph's edges with their scores and notes, strongest |score| first."""
    return data.query(
        "SELECT src, dst, score, note FROM subgraph_edges WHERE subgraph_id = ? "
        "ORDER BY abs(score) DESC, src, dst",
        (subgraph_id,),
    )


def circuits_at(checkpoint_id: str) -> pd.DataFrame:
    """The stored circuits of a checkpoint, to compare a subgraph with."""
    return data.query(
        """SELECT c.circuit_id, r.method || ' · ' || c.rule || ' · ' || c.n_edges || ' edges'
                  AS label
           FROM circuits c JOIN runs r USING (run_id) WHERE r.checkpoint_id = ?
           ORDER BY r.method, c.n_edges""",
        (checkpoint_id,),
    )


# -- attribution graphs ----------------------------------------------------------------------


def graphs(model_id: str) -> pd.DataFrame:
    """A model's stored attribution graphs, newest first, with a display label (graphs
    imported without a checkpoint belong to no model and are not listed)."""
    return data.query(
        """SELECT g.graph_id, g.checkpoint_id, c.step, g.set_id, g.set_path, g.text, g.tokens,
                  g.params, g.n_nodes, g.n_edges, g.n_nodes_kept, g.n_edges_kept,
                  g.replacement_score, g.completeness_score, g.adjacency_path, g.seconds,
                  'step ' || c.step || ' · ' || g.text || ' · ' || g.graph_id AS label
           FROM graphs g JOIN checkpoints c USING (checkpoint_id)
           WHERE c.model_id = ? ORDER BY g.created_at DESC, g.graph_id""",
        (model_id,),
    )


def graph_nodes(graph_id: str) -> pd.DataFrame:
    """Every node of a stored graph, in adjacency order, kept or not."""
    return data.query(
        """SELECT node, node_id, kind, layer, position, feature, sae_id, token_id, token,
                  activation, probability, influence, cumulative_influence, kept
           FROM graph_nodes WHERE graph_id = ? ORDER BY node""",
        (graph_id,),
    )


def graph_edges(graph_id: str) -> pd.DataFrame:
    """The edges a stored graph's pruning kept (node indices), strongest |weight| first."""
    return data.query(
        "SELECT src, dst, weight FROM graph_edges WHERE graph_id = ? "
        "ORDER BY abs(weight) DESC, dst, src",
        (graph_id,),
    )


# -- prompt-level views ----------------------------------------------------------------------


def prompts_analysed(model_id: str) -> pd.DataFrame:
    """A model's stored prompt views, newest first, with a display label."""
    return data.query(
        """SELECT p.prompt_id, p.checkpoint_id, c.step, p.text, p.tokens, p.predicted, p.tau,
                  'step ' || c.step || ' · ' || p.text AS label
           FROM prompt_views p JOIN checkpoints c USING (checkpoint_id)
           WHERE c.model_id = ? ORDER BY p.created_at DESC""",
        (model_id,),
    )


def model_source(model_id: str) -> pd.DataFrame:
    """Where a model's checkpoints are loaded from, and their steps."""
    return data.query(
        """SELECT m.source, c.step, c.checkpoint_id FROM models m JOIN checkpoints c
           USING (model_id) WHERE m.model_id = ? ORDER BY c.step""",
        (model_id,),
    )


def prompt_attention(prompt_id: str, layer: int, head: int) -> pd.DataFrame:
    """One head's attention pattern for a stored prompt (query_pos, key_pos, weight)."""
    return data.query(
        """SELECT query_pos, key_pos, weight FROM prompt_attention
           WHERE prompt_id = ? AND layer = ? AND head = ? ORDER BY query_pos, key_pos""",
        (prompt_id, layer, head),
    )


def prompt_lens(prompt_id: str) -> pd.DataFrame:
    """The logit lens: per layer and position, the top token and the prediction's probability."""
    return data.query(
        """SELECT t.layer, t.position, t.token AS top_token, t.prob AS top_prob,
                  p.prob AS predicted_prob
           FROM prompt_logit_lens t JOIN prompt_logit_lens p
             ON p.prompt_id = t.prompt_id AND p.layer = t.layer AND p.position = t.position
            AND p.rank IS NULL
           WHERE t.prompt_id = ? AND t.rank = 0 ORDER BY t.layer, t.position""",
        (prompt_id,),
    )


def prompt_dla(prompt_id: str) -> pd.DataFrame:
    """Direct logit attribution to the predicted token, largest |score| first."""
    return data.query(
        "SELECT node_id, score FROM prompt_dla WHERE prompt_id = ? ORDER BY abs(score) DESC",
        (prompt_id,),
    )


def prompt_flow(prompt_id: str) -> pd.DataFrame:
    """Attention rollout and flow: per method, layer and position, the score."""
    return data.query(
        "SELECT method, layer, position, score FROM prompt_flow WHERE prompt_id = ? "
        "ORDER BY method, layer, position",
        (prompt_id,),
    )


def prompt_routes(prompt_id: str) -> pd.DataFrame:
    """The information-flow routes graph's edges."""
    return data.query(
        "SELECT src_layer, src_pos, dst_layer, dst_pos, kind, importance FROM prompt_routes "
        "WHERE prompt_id = ? ORDER BY dst_layer, dst_pos, src_pos",
        (prompt_id,),
    )


# -- why this token: input attribution, Patchscope -------------------------------------------


def prompt_explanations(prompt_id: str) -> pd.DataFrame:
    """The input attributions stored for a prompt, newest first: target, its logit and
    probability, the baseline's logit, parameters, with a display label."""
    return data.query(
        """SELECT explanation_id, target_id, target, target_logit, target_prob, baseline_logit,
                  top_k, params,
                  'target ' || target || ' · ' || explanation_id AS label
           FROM prompt_explanations WHERE prompt_id = ? ORDER BY created_at DESC""",
        (prompt_id,),
    )


def explanation_scores(explanation_id: str) -> pd.DataFrame:
    """Every method's score of every input token (method, position, score), in the order the
    methods were computed."""
    return data.query(
        """SELECT a.method, a.position, a.score FROM prompt_input_attr a
           WHERE a.explanation_id = ? AND a.layer IS NULL ORDER BY a.method, a.position""",
        (explanation_id,),
    )


def explanation_layers(explanation_id: str) -> pd.DataFrame:
    """The methods' scores over each layer's positions (method, layer, position, score), where
    a method defines them."""
    return data.query(
        """SELECT method, layer, position, score FROM prompt_input_attr
           WHERE explanation_id = ? AND layer IS NOT NULL ORDER BY method, layer, position""",
        (explanation_id,),
    )


def explanation_methods(explanation_id: str) -> pd.DataFrame:
    """Per method: the areas under its deletion and insertion curves (of the probability, and of
    the logit as a share of its change from the baseline), the sum of its token scores,
    integrated gradients' convergence delta, and its cost in seconds."""
    return data.query(
        """SELECT method, deletion_auc, insertion_auc, deletion_logit_auc, insertion_logit_auc,
                  total, delta, seconds
           FROM prompt_attr_methods WHERE explanation_id = ?
           ORDER BY deletion_logit_auc, method""",
        (explanation_id,),
    )


def explanation_curves(explanation_id: str) -> pd.DataFrame:
    """The deletion and insertion curves: per method, kind and k, the target's probability
    and logit."""
    return data.query(
        """SELECT method, kind, k, prob, logit FROM prompt_attr_curves
           WHERE explanation_id = ? ORDER BY method, kind, k""",
        (explanation_id,),
    )


def explanation_agreement(explanation_id: str) -> pd.DataFrame:
    """Every pair of methods: Spearman's rank correlation and the top-k share."""
    return data.query(
        """SELECT method_a, method_b, spearman, top_k_share FROM prompt_attr_agreement
           WHERE explanation_id = ? ORDER BY method_a, method_b""",
        (explanation_id,),
    )


def prompt_patchscope(prompt_id: str) -> pd.DataFrame:
    """The newest Patchscope of a prompt: per source stream, the target stream and the decoded
    text, with its template, source position and the checkpoint that decoded it."""
    return data.query(
        """WITH newest AS (
             SELECT patchscope_id, template, source_position, inspector_id
             FROM prompt_patchscopes
             WHERE prompt_id = ? ORDER BY created_at DESC LIMIT 1)
           SELECT s.source_layer, s.target_layer, s.text, s.token_ids, n.template,
                  n.source_position, n.inspector_id
           FROM prompt_patchscope s JOIN newest n USING (patchscope_id)
           ORDER BY s.source_layer""",
        (prompt_id,),
    )


def prompt_tuned_lens(prompt_id: str) -> pd.DataFrame:
    """The newest tuned lens's predictions on a prompt: per stream (0: the embeddings; the last:
    the final residual) and position, the top token and the probability of the prediction."""
    return data.query(
        """WITH newest AS (
             SELECT p.lens_id FROM prompt_tuned_lens p JOIN tuned_lenses l USING (lens_id)
             WHERE p.prompt_id = ? ORDER BY l.created_at DESC LIMIT 1)
           SELECT t.lens_id, t.layer, t.position, t.token AS top_token, t.prob AS top_prob,
                  p.prob AS predicted_prob
           FROM prompt_tuned_lens t JOIN newest USING (lens_id)
           JOIN prompt_tuned_lens p ON p.prompt_id = t.prompt_id AND p.lens_id = t.lens_id
             AND p.layer = t.layer AND p.position = t.position AND p.rank IS NULL
           WHERE t.prompt_id = ? AND t.rank = 0 ORDER BY t.layer, t.position""",
        (prompt_id, prompt_id),
    )
