"""Schema v1 (docs/schema.md, "Tables") and forward migrations.

`MIGRATIONS[v]` holds the statements that take a database from version v-1 to v. A database is
migrated forward when opened for writing; a database newer than this code is refused.
Large tables (`node_scores`, `edges`, `circuit_edges`, `feature_examples`) have no index so that
bulk inserts stay fast; DuckDB's zone maps serve the usual filters by `run_id`.
"""

SCHEMA_V1 = [
    """CREATE TABLE models (
        model_id VARCHAR PRIMARY KEY, source VARCHAR, architecture VARCHAR,
        n_layers INTEGER, n_heads INTEGER, d_model INTEGER, d_vocab INTEGER, config JSON)""",
    """CREATE TABLE checkpoints (
        checkpoint_id VARCHAR PRIMARY KEY, model_id VARCHAR, step BIGINT, path VARCHAR,
        sha256 VARCHAR, registered_at TIMESTAMP DEFAULT current_timestamp)""",
    """CREATE TABLE tasks (
        task_id VARCHAR PRIMARY KEY, name VARCHAR, source VARCHAR, metric VARCHAR,
        n_prompts INTEGER, sha256 VARCHAR, spec JSON)""",
    """CREATE TABLE prompts (
        task_id VARCHAR, idx INTEGER, clean_tokens INTEGER[], corrupt_tokens INTEGER[],
        answer INTEGER, wrong INTEGER, clean_text VARCHAR, corrupt_text VARCHAR,
        PRIMARY KEY (task_id, idx))""",
    """CREATE TABLE runs (
        run_id VARCHAR PRIMARY KEY, run_key VARCHAR, pipeline VARCHAR, method VARCHAR,
        checkpoint_id VARCHAR, task_id VARCHAR, params JSON, status VARCHAR, error VARCHAR,
        metric_clean DOUBLE, metric_corrupt DOUBLE, started_at TIMESTAMP,
        finished_at TIMESTAMP, code_version VARCHAR)""",
    """CREATE TABLE nodes (
        model_id VARCHAR, node_id VARCHAR, kind VARCHAR, layer INTEGER, head INTEGER,
        sae_id VARCHAR, feature INTEGER, label VARCHAR, PRIMARY KEY (model_id, node_id))""",
    """CREATE TABLE node_scores (
        run_id VARCHAR, node_id VARCHAR, position INTEGER, score DOUBLE)""",
    """CREATE TABLE edges (run_id VARCHAR, src VARCHAR, dst VARCHAR, score DOUBLE)""",
    """CREATE TABLE circuits (
        circuit_id VARCHAR PRIMARY KEY, run_id VARCHAR, name VARCHAR, rule VARCHAR,
        n_nodes INTEGER, n_edges INTEGER, faithfulness DOUBLE,
        created_at TIMESTAMP DEFAULT current_timestamp)""",
    """CREATE TABLE circuit_edges (circuit_id VARCHAR, src VARCHAR, dst VARCHAR, score DOUBLE)""",
    """CREATE TABLE saes (
        sae_id VARCHAR PRIMARY KEY, checkpoint_id VARCHAR, hook VARCHAR, architecture VARCHAR,
        d_in INTEGER, d_sae INTEGER, path VARCHAR, l0 DOUBLE, explained_variance DOUBLE,
        ce_loss_recovered DOUBLE)""",
    """CREATE TABLE features (
        sae_id VARCHAR, feature INTEGER, density DOUBLE, max_activation DOUBLE,
        mean_activation DOUBLE, top_logits JSON)""",
    """CREATE TABLE feature_examples (
        sae_id VARCHAR, feature INTEGER, rank INTEGER, source VARCHAR, token_ids INTEGER[],
        tokens VARCHAR[], position INTEGER, activation DOUBLE)""",
]

# v2: the faithfulness-vs-size curve of each edge run.
SCHEMA_V2 = [
    """CREATE TABLE faithfulness_curves (
        run_id VARCHAR, requested_edges INTEGER, n_edges INTEGER, faithfulness DOUBLE)""",
]

# v3: named measurements of a run (e.g. the ROC AUC of its edge scores against a known circuit).
SCHEMA_V3 = ["""CREATE TABLE run_metrics (run_id VARCHAR, metric VARCHAR, value DOUBLE)"""]

# v4: SAEs, their features and examples belong to the run that made them (deleted with it on
# --force); quality details per SAE; dead/dense flags, suppressed tokens and an activation
# histogram per feature.
SCHEMA_V4 = [
    "ALTER TABLE saes ADD COLUMN run_id VARCHAR",
    "ALTER TABLE saes ADD COLUMN source VARCHAR",
    "ALTER TABLE saes ADD COLUMN corpus VARCHAR",
    "ALTER TABLE saes ADD COLUMN n_tokens BIGINT",
    "ALTER TABLE saes ADD COLUMN mse DOUBLE",
    "ALTER TABLE saes ADD COLUMN ce_loss_clean DOUBLE",
    "ALTER TABLE saes ADD COLUMN ce_loss_sae DOUBLE",
    "ALTER TABLE saes ADD COLUMN ce_loss_zero DOUBLE",
    "ALTER TABLE saes ADD COLUMN dead_fraction DOUBLE",
    "ALTER TABLE saes ADD COLUMN histogram_edges DOUBLE[]",
    "ALTER TABLE features ADD COLUMN run_id VARCHAR",
    "ALTER TABLE features ADD COLUMN dead BOOLEAN",
    "ALTER TABLE features ADD COLUMN dense BOOLEAN",
    "ALTER TABLE features ADD COLUMN bottom_logits JSON",
    "ALTER TABLE features ADD COLUMN histogram INTEGER[]",
    "ALTER TABLE feature_examples ADD COLUMN run_id VARCHAR",
]

# v5: a head node's port (q, k, v, pattern) as a column, so that queries filter on columns rather
# than on the id's spelling; filled in for stored nodes from their ids (`workbench.core.Node`).
SCHEMA_V5 = [
    "ALTER TABLE nodes ADD COLUMN port VARCHAR",
    r"""UPDATE nodes SET port = regexp_extract(node_id, '<(q|k|v|pattern)>$', 1)
        WHERE kind = 'attn_head' AND node_id LIKE '%>'""",
]

# v6: work in progress and circuits across training.
# - `run_queue`: the jobs a runner has yet to finish (status `queued` or `running`, with the
#   process and a heartbeat); a job's row goes when its runs are stored; rows of a process that
#   died are swept by the next runner.
# - `checkpoints.train_loss`: the training loss at the checkpoint (zoo meta.json, HF Trainer
#   trainer_state.json), for the loss curve beside formation steps.
# - `watched_checkpoints`: what `workbench watch` has seen, by path, with a fingerprint of the
#   files (names, sizes, mtimes), so a rescan costs a stat per file.
# - the views `node_timeline` and `edge_timeline` (scores by training step), `formation_steps`
#   (per node and run variant (pipeline, method, params): the first step from which |score|
#   stays at or above half its peak over training),
#   and the table macro `circuit_diff(circuit_a, circuit_b)`.
SCHEMA_V6 = [
    """CREATE TABLE run_queue (
        job_id VARCHAR PRIMARY KEY, pipeline VARCHAR, method VARCHAR, checkpoint_id VARCHAR,
        task VARCHAR, status VARCHAR, run_id VARCHAR, pid INTEGER, host VARCHAR,
        queued_at TIMESTAMP, started_at TIMESTAMP, heartbeat_at TIMESTAMP)""",
    "ALTER TABLE checkpoints ADD COLUMN train_loss DOUBLE",
    """CREATE TABLE watched_checkpoints (
        path VARCHAR PRIMARY KEY, fingerprint VARCHAR, checkpoint_id VARCHAR, status VARCHAR,
        error VARCHAR, seen_at TIMESTAMP)""",
    """CREATE VIEW node_timeline AS
        SELECT c.model_id, r.task_id, r.method, s.node_id, s.position, c.step, s.score,
               r.run_id, r.pipeline, r.params
        FROM node_scores s JOIN runs r USING (run_id) JOIN checkpoints c USING (checkpoint_id)
        WHERE r.status = 'done'""",
    """CREATE VIEW edge_timeline AS
        SELECT c.model_id, r.task_id, r.method, e.src, e.dst, c.step, e.score, r.run_id
        FROM edges e JOIN runs r USING (run_id) JOIN checkpoints c USING (checkpoint_id)
        WHERE r.status = 'done'""",
    """CREATE VIEW formation_steps AS
        WITH t AS (
            SELECT model_id, task_id, pipeline, method, CAST(params AS VARCHAR) AS params,
                   node_id, step, abs(score) AS size
            FROM node_timeline WHERE position IS NULL),
        peak AS (
            SELECT model_id, task_id, pipeline, method, params, node_id, max(size) AS peak
            FROM t GROUP BY ALL),
        below AS (
            SELECT t.model_id, t.task_id, t.pipeline, t.method, t.params, t.node_id,
                   max(t.step) AS last_below
            FROM t JOIN peak USING (model_id, task_id, pipeline, method, params, node_id)
            WHERE t.size < peak.peak / 2 GROUP BY ALL),
        formed AS (
            SELECT t.model_id, t.task_id, t.pipeline, t.method, t.params, t.node_id,
                   min(t.step) AS formation_step
            FROM t LEFT JOIN below USING (model_id, task_id, pipeline, method, params, node_id)
            WHERE t.step > coalesce(below.last_below, -1) GROUP BY ALL)
        SELECT p.model_id, p.task_id, p.method, p.node_id, f.formation_step, p.peak,
               p.pipeline, p.params
        FROM peak p LEFT JOIN formed f
          USING (model_id, task_id, pipeline, method, params, node_id)""",
    """CREATE MACRO circuit_diff(circuit_a, circuit_b) AS TABLE
        SELECT coalesce(x.src, y.src) AS src, coalesce(x.dst, y.dst) AS dst,
               CASE WHEN x.src IS NULL THEN 'added' WHEN y.src IS NULL THEN 'removed'
                    ELSE 'kept' END AS status,
               x.score AS score_a, y.score AS score_b
        FROM (SELECT src, dst, score FROM circuit_edges WHERE circuit_id = circuit_a) x
        FULL OUTER JOIN (SELECT src, dst, score FROM circuit_edges WHERE circuit_id = circuit_b) y
          ON x.src = y.src AND x.dst = y.dst""",
]

# v7: curated subgraphs (`workbench.subgraphs`): a named set of a checkpoint's nodes, the edges
# among them with their scores, node groups (supernodes) and notes, saved from the app.
SCHEMA_V7 = [
    """CREATE TABLE subgraphs (
        subgraph_id VARCHAR PRIMARY KEY, name VARCHAR, model_id VARCHAR, checkpoint_id VARCHAR,
        source VARCHAR, description VARCHAR, n_nodes INTEGER, n_edges INTEGER,
        saved_at TIMESTAMP)""",
    """CREATE TABLE subgraph_nodes (
        subgraph_id VARCHAR, node_id VARCHAR, group_label VARCHAR, note VARCHAR,
        PRIMARY KEY (subgraph_id, node_id))""",
    """CREATE TABLE subgraph_edges (
        subgraph_id VARCHAR, src VARCHAR, dst VARCHAR, score DOUBLE, note VARCHAR)""",
]

# v8: prompt-level views (`workbench run prompt`, `workbench.prompt.views`): one prompt at one
# checkpoint, keyed by prompt_id (a hash of the checkpoint, the tokens and tau).
SCHEMA_V8 = [
    """CREATE TABLE prompt_views (
        prompt_id VARCHAR PRIMARY KEY, checkpoint_id VARCHAR, text VARCHAR, token_ids INTEGER[],
        tokens VARCHAR[], predicted_id INTEGER, predicted VARCHAR, tau DOUBLE,
        created_at TIMESTAMP)""",
    """CREATE TABLE prompt_attention (
        prompt_id VARCHAR, layer INTEGER, head INTEGER, query_pos INTEGER, key_pos INTEGER,
        weight DOUBLE)""",
    """CREATE TABLE prompt_logit_lens (
        prompt_id VARCHAR, layer INTEGER, position INTEGER, rank INTEGER, token_id INTEGER,
        token VARCHAR, prob DOUBLE)""",
    "CREATE TABLE prompt_dla (prompt_id VARCHAR, node_id VARCHAR, score DOUBLE)",
    """CREATE TABLE prompt_flow (
        prompt_id VARCHAR, method VARCHAR, layer INTEGER, position INTEGER, score DOUBLE)""",
    """CREATE TABLE prompt_routes (
        prompt_id VARCHAR, src_layer INTEGER, src_pos INTEGER, dst_layer INTEGER,
        dst_pos INTEGER, kind VARCHAR, importance DOUBLE)""",
]

# Tables every run writes rows into, keyed by run_id (deleted together on --force re-runs):
# those of schema v9, `transcoder_sets` (v10) and `spot_checks` (v13).
V9_RUN_TABLES = (
    "node_scores",
    "edges",
    "faithfulness_curves",
    "run_metrics",
    "saes",
    "features",
    "feature_examples",
)
RUN_TABLES = (*V9_RUN_TABLES, "transcoder_sets", "spot_checks")


def _delete_rows_of(runs: str, tables: tuple[str, ...] = RUN_TABLES) -> list[str]:
    """Statements deleting every row of the runs whose ids `runs` (a query) selects, from the
    run tables `tables` (those of the schema version the statements run in)."""
    circuits = f"SELECT circuit_id FROM circuits WHERE run_id IN ({runs})"
    return [
        f"DELETE FROM circuit_edges WHERE circuit_id IN ({circuits})",
        f"DELETE FROM circuits WHERE run_id IN ({runs})",
        *(f"DELETE FROM {table} WHERE run_id IN ({runs})" for table in tables),
        f"DELETE FROM runs WHERE run_id IN ({runs})",
    ]


# The order in which the done runs of one run key were stored (the first one is kept).
_STORED_ORDER = "finished_at NULLS LAST, started_at NULLS LAST, run_id"
# A queue row is live while its runner's last sign of life (its heartbeat, refreshed for every
# row of a live runner) is younger than `run_queue_stale_seconds` (a DuckDB variable: `SET
# VARIABLE run_queue_stale_seconds = 60`; default 600). Queue timestamps are UTC.
_LIVE_SINCE = (
    "make_timestamp(epoch_us(now())) - "
    "to_seconds(coalesce(getvariable('run_queue_stale_seconds'), 600)::DOUBLE)"
)

# v9: one done run per run key, and the live part of the run queue.
# - `done_runs`: the run key of every done run, the primary key, written in the transaction
#   that stores the run: a second writer that computed the same run finds its key taken and
#   stores nothing (a --force run replaces the row with its own, in its transaction).
#   Migrating keeps the earliest stored done run of each key; the later duplicates are deleted
#   with all their rows, unless a curated subgraph names the run or one of its circuits as
#   its source: such a run stays, with status `duplicate` (out of every view of done runs).
# - the view `run_queue_live`: the queue rows whose runner showed a sign of life recently;
#   rows of a killed runner drop out of it (and out of the table when the next runner starts).
SCHEMA_V9 = [
    "CREATE TABLE done_runs (run_key VARCHAR PRIMARY KEY, run_id VARCHAR NOT NULL)",
    f"""CREATE TEMP TABLE v9_duplicates AS
        SELECT run_id FROM (
            SELECT run_id, row_number() OVER (PARTITION BY run_key ORDER BY {_STORED_ORDER})
              AS nth
            FROM runs WHERE status = 'done')
        WHERE nth > 1""",
    f"""INSERT INTO done_runs
        SELECT run_key, run_id FROM (
            SELECT run_key, run_id,
                   row_number() OVER (PARTITION BY run_key ORDER BY {_STORED_ORDER}) AS nth
            FROM runs WHERE status = 'done')
        WHERE nth = 1""",
    """UPDATE runs SET status = 'duplicate'
        WHERE run_id IN (SELECT run_id FROM v9_duplicates)
          AND (('run:' || run_id) IN (SELECT source FROM subgraphs)
               OR run_id IN (SELECT c.run_id FROM circuits c JOIN subgraphs s
                               ON s.source = 'circuit:' || c.circuit_id))""",
    "DELETE FROM v9_duplicates WHERE run_id IN (SELECT run_id FROM runs WHERE status <> 'done')",
    *_delete_rows_of("SELECT run_id FROM v9_duplicates", V9_RUN_TABLES),
    "DROP TABLE v9_duplicates",
    f"""CREATE VIEW run_queue_live AS
        SELECT * FROM run_queue
        WHERE coalesce(heartbeat_at, started_at, queued_at) >= {_LIVE_SINCE}""",
]

# v10: transcoder sets and the attribution graphs of single prompts.
# - a transcoder set is stored by the run that trained or loaded it (`transcoder_sets`, one row,
#   with the replacement model's cross-entropy); each layer's transcoder is a row of `saes`
#   (sae_id `<set_id>-L<layer>`, `hook` its input, `hook_out` its output, `set_id` its set), so
#   its features, their statistics and examples are `features` / `feature_examples` rows like
#   an SAE's;
# - a graph (`graphs`, keyed by graph_id: a hash of the checkpoint, the set, the prompt's
#   tokens and the parameters) has every node (`graph_nodes`, with its influence and whether
#   pruning keeps it) and the edges pruning keeps (`graph_edges`, by node index); the full
#   adjacency is a Parquet file (`graphs.adjacency_path`) of (src, dst, weight);
# - the view `graph_component_edges` reduces kept edges over positions to the model graph's
#   nodes (input, m<layer>, logits), so a graph compares with head and edge circuits.
SCHEMA_V10 = [
    "ALTER TABLE saes ADD COLUMN hook_out VARCHAR",
    "ALTER TABLE saes ADD COLUMN set_id VARCHAR",
    """CREATE TABLE transcoder_sets (
        set_id VARCHAR PRIMARY KEY, run_id VARCHAR, checkpoint_id VARCHAR, source VARCHAR,
        path VARCHAR, architecture VARCHAR, n_layers INTEGER, d_transcoder INTEGER,
        hook_in VARCHAR, hook_out VARCHAR, corpus VARCHAR, n_tokens BIGINT, l0 DOUBLE,
        explained_variance DOUBLE, ce_loss_clean DOUBLE, ce_loss_replaced DOUBLE,
        ce_loss_zero DOUBLE, ce_loss_recovered DOUBLE)""",
    """CREATE TABLE graphs (
        graph_id VARCHAR PRIMARY KEY, checkpoint_id VARCHAR, set_id VARCHAR, set_path VARCHAR,
        text VARCHAR, token_ids INTEGER[], tokens VARCHAR[], params JSON,
        n_active_features INTEGER, n_features INTEGER, n_nodes INTEGER, n_edges BIGINT,
        n_nodes_kept INTEGER, n_edges_kept INTEGER, replacement_score DOUBLE,
        completeness_score DOUBLE, adjacency_path VARCHAR, seconds DOUBLE,
        created_at TIMESTAMP)""",
    """CREATE TABLE graph_nodes (
        graph_id VARCHAR, node INTEGER, node_id VARCHAR, kind VARCHAR, layer INTEGER,
        position INTEGER, feature INTEGER, sae_id VARCHAR, component VARCHAR, token_id INTEGER,
        token VARCHAR, activation DOUBLE, probability DOUBLE, influence DOUBLE,
        cumulative_influence DOUBLE, kept BOOLEAN)""",
    """CREATE TABLE graph_edges (graph_id VARCHAR, src INTEGER, dst INTEGER, weight DOUBLE)""",
    """CREATE VIEW graph_component_edges AS
        SELECT e.graph_id, s.component AS src, d.component AS dst,
               sum(e.weight) AS weight, sum(abs(e.weight)) AS abs_weight, count(*) AS n_edges
        FROM graph_edges e
        JOIN graph_nodes s ON s.graph_id = e.graph_id AND s.node = e.src
        JOIN graph_nodes d ON d.graph_id = e.graph_id AND d.node = e.dst
        GROUP BY ALL""",
]

# v11: stored token strings are each token's text as its tokenizer decodes it alone (" Paris"),
# no longer the tokenizer's piece ("ĠParis"). SQL cannot decode, so the migration lists the
# checkpoints whose rows hold token strings in `token_text_pending`; the next pipeline run or
# `workbench migrate` rewrites each one's strings from the token ids stored beside them, with
# the checkpoint's own tokenizer, and removes its row (`workbench.token_text`). A checkpoint
# whose tokenizer cannot be loaded stays listed, its strings unchanged.
SCHEMA_V11 = [
    "CREATE TABLE token_text_pending (checkpoint_id VARCHAR PRIMARY KEY)",
    """INSERT INTO token_text_pending
        SELECT DISTINCT checkpoint_id FROM (
            SELECT checkpoint_id FROM prompt_views
            UNION ALL SELECT checkpoint_id FROM graphs
            UNION ALL SELECT checkpoint_id FROM saes WHERE sae_id IN (
                SELECT sae_id FROM features UNION SELECT sae_id FROM feature_examples))
        WHERE checkpoint_id IS NOT NULL""",
]

# v12: the head catalogue (`workbench run catalogue`, `workbench.catalogue`): every head's scores
# at one checkpoint with no task, keyed by catalogue_id (a hash of the checkpoint, the dtype and
# the generated sequences' parameters); circuits evaluated across checkpoints
# (`cross_recovery`); and the view `method_agreement`.
SCHEMA_V12 = [
    """CREATE TABLE catalogues (
        catalogue_id VARCHAR PRIMARY KEY, checkpoint_id VARCHAR, params JSON, seconds DOUBLE,
        created_at TIMESTAMP)""",
    """CREATE TABLE head_catalogue (
        catalogue_id VARCHAR, checkpoint_id VARCHAR, node_id VARCHAR, layer INTEGER,
        head INTEGER, score VARCHAR, value DOUBLE)""",
    """CREATE TABLE head_composition (
        catalogue_id VARCHAR, checkpoint_id VARCHAR, mode VARCHAR, src VARCHAR, dst VARCHAR,
        value DOUBLE)""",
    # a stored circuit evaluated at another checkpoint of its training run
    # (`workbench run cross-recovery`)
    """CREATE TABLE cross_recovery (
        circuit_id VARCHAR, checkpoint_id VARCHAR, task_id VARCHAR, dtype VARCHAR,
        faithfulness DOUBLE, created_at TIMESTAMP)""",
    # every pair of done runs at one checkpoint and task that scored the same nodes or edges:
    # Spearman's rank correlation of their scores over what both scored (ties take their mean
    # rank), signed and of magnitudes; NULL where one side is constant
    """CREATE VIEW method_agreement AS
        WITH done AS (
          SELECT run_id, checkpoint_id, task_id, method FROM runs WHERE status = 'done'),
        items AS (
          SELECT run_id, 'node' AS kind, node_id || '@' || coalesce(position, -1) AS item, score
          FROM node_scores
          UNION ALL
          SELECT run_id, 'edge' AS kind, src || '->' || dst AS item, score FROM edges),
        pairs AS (
          SELECT a.checkpoint_id, a.task_id, i.kind, a.run_id AS run_a, a.method AS method_a,
                 b.run_id AS run_b, b.method AS method_b, i.score AS score_a, j.score AS score_b
          FROM done a JOIN done b ON b.checkpoint_id = a.checkpoint_id
            AND b.task_id = a.task_id
            AND (a.method < b.method OR (a.method = b.method AND a.run_id < b.run_id))
          JOIN items i ON i.run_id = a.run_id
          JOIN items j ON j.run_id = b.run_id AND j.kind = i.kind AND j.item = i.item),
        ranked AS (
          SELECT checkpoint_id, task_id, kind, run_a, method_a, run_b, method_b,
            rank() OVER (PARTITION BY run_a, run_b, kind ORDER BY score_a)
              + (count(*) OVER (PARTITION BY run_a, run_b, kind, score_a) - 1) / 2 AS rank_a,
            rank() OVER (PARTITION BY run_a, run_b, kind ORDER BY score_b)
              + (count(*) OVER (PARTITION BY run_a, run_b, kind, score_b) - 1) / 2 AS rank_b,
            rank() OVER (PARTITION BY run_a, run_b, kind ORDER BY abs(score_a))
              + (count(*) OVER (PARTITION BY run_a, run_b, kind, abs(score_a)) - 1) / 2
              AS abs_rank_a,
            rank() OVER (PARTITION BY run_a, run_b, kind ORDER BY abs(score_b))
              + (count(*) OVER (PARTITION BY run_a, run_b, kind, abs(score_b)) - 1) / 2
              AS abs_rank_b
          FROM pairs)
        SELECT checkpoint_id, task_id, kind, run_a, method_a, run_b, method_b, count(*) AS n,
               CASE WHEN NOT isnan(corr(rank_a, rank_b)) THEN corr(rank_a, rank_b) END
                 AS spearman,
               CASE WHEN NOT isnan(corr(abs_rank_a, abs_rank_b))
                 THEN corr(abs_rank_a, abs_rank_b) END AS spearman_abs
        FROM ranked GROUP BY ALL HAVING count(*) >= 3""",
]

# v13: reliability stored with the scores: each node's and edge's standard error over prompts
# (NULL for runs made before, and for methods that do not compute one), and the spot checks of
# approximate methods (`workbench.spotcheck`): each checked item (a node, or an edge's src and
# dst), the draw it came from (`top` or `random`), the method's estimate and the exact score.
SCHEMA_V13 = [
    "ALTER TABLE node_scores ADD COLUMN stderr DOUBLE",
    "ALTER TABLE edges ADD COLUMN stderr DOUBLE",
    """CREATE TABLE spot_checks (
        run_id VARCHAR, node_id VARCHAR, src VARCHAR, dst VARCHAR, sample VARCHAR,
        estimate DOUBLE, exact DOUBLE)""",
]

# v14: stability over seeds (`workbench run seeds`, `workbench.seeds`): training runs that differ
# only in their seed, declared a group (`seed_groups`), and the view `seed_stability` comparing,
# per pair of members, task, method and step, the circuits of their newest done runs: shared
# edges and nodes (Jaccard), the layer profile (edges counted per source and destination with the
# head index dropped: Jaccard of the counts, unchanged by renumbering the heads of a layer), the
# rank correlation of all their edge scores, and each circuit's faithfulness on the other seed's
# checkpoint (`cross_recovery`, NULL until evaluated). And each head's top token mappings from
# its parameters (`head_mappings`, `workbench.catalogue.maps`) in the head catalogue; the
# timeline views carry each score's standard error (v13).
SCHEMA_V14 = [
    """CREATE OR REPLACE VIEW node_timeline AS
        SELECT c.model_id, r.task_id, r.method, s.node_id, s.position, c.step, s.score,
               r.run_id, r.pipeline, r.params, s.stderr
        FROM node_scores s JOIN runs r USING (run_id) JOIN checkpoints c USING (checkpoint_id)
        WHERE r.status = 'done'""",
    """CREATE OR REPLACE VIEW edge_timeline AS
        SELECT c.model_id, r.task_id, r.method, e.src, e.dst, c.step, e.score, r.run_id,
               e.stderr
        FROM edges e JOIN runs r USING (run_id) JOIN checkpoints c USING (checkpoint_id)
        WHERE r.status = 'done'""",
    """CREATE TABLE head_mappings (
        catalogue_id VARCHAR, checkpoint_id VARCHAR, node_id VARCHAR, circuit VARCHAR,
        src_rank INTEGER, src_token INTEGER, src_text VARCHAR, amplification DOUBLE,
        rank INTEGER, dst_token INTEGER, dst_text VARCHAR, value DOUBLE)""",
    """CREATE TABLE seed_groups (
        group_id VARCHAR, model_id VARCHAR, source VARCHAR, added_at TIMESTAMP,
        PRIMARY KEY (group_id, model_id))""",
    r"""CREATE VIEW seed_stability AS
        WITH newest AS (
          SELECT g.group_id, k.model_id, k.step, r.task_id, r.method, r.run_id,
                 r.checkpoint_id, c.circuit_id, c.faithfulness, c.n_edges
          FROM seed_groups g JOIN checkpoints k USING (model_id)
          JOIN runs r USING (checkpoint_id) JOIN circuits c USING (run_id)
          WHERE r.status = 'done'
          QUALIFY row_number() OVER (
            PARTITION BY g.group_id, k.model_id, k.step, r.task_id, r.method
            ORDER BY r.finished_at DESC, c.created_at DESC) = 1),
        pairs AS (
          SELECT a.group_id, a.task_id, a.method, a.step, a.model_id AS model_a,
                 b.model_id AS model_b, a.run_id AS run_a, b.run_id AS run_b,
                 a.circuit_id AS circuit_a, b.circuit_id AS circuit_b,
                 a.checkpoint_id AS checkpoint_a, b.checkpoint_id AS checkpoint_b,
                 a.n_edges AS edges_a, b.n_edges AS edges_b,
                 a.faithfulness AS faithfulness_a, b.faithfulness AS faithfulness_b
          FROM newest a JOIN newest b ON b.group_id = a.group_id AND b.task_id = a.task_id
            AND b.method = a.method AND b.step = a.step AND a.model_id < b.model_id),
        members AS (
          SELECT DISTINCT circuit_id, src, dst FROM circuit_edges
          WHERE circuit_id IN (SELECT circuit_a FROM pairs UNION SELECT circuit_b FROM pairs)),
        shared_edges AS (
          SELECT p.circuit_a, p.circuit_b, count(*) AS shared
          FROM pairs p JOIN members x ON x.circuit_id = p.circuit_a
          JOIN members y ON y.circuit_id = p.circuit_b AND y.src = x.src AND y.dst = x.dst
          GROUP BY ALL),
        ends AS (
          SELECT DISTINCT circuit_id, regexp_replace(node, '<[a-z]+>$', '') AS node
          FROM (SELECT circuit_id, src AS node FROM members
                UNION ALL SELECT circuit_id, dst FROM members)),
        node_counts AS (
          SELECT p.circuit_a, p.circuit_b,
            (SELECT count(*) FROM ends WHERE circuit_id = p.circuit_a) AS nodes_a,
            (SELECT count(*) FROM ends WHERE circuit_id = p.circuit_b) AS nodes_b,
            (SELECT count(*) FROM ends x JOIN ends y ON y.node = x.node
             WHERE x.circuit_id = p.circuit_a AND y.circuit_id = p.circuit_b) AS nodes_shared
          FROM pairs p),
        profile AS (
          SELECT circuit_id, regexp_replace(src, '\.h[0-9]+', '') AS src_layer,
                 regexp_replace(dst, '\.h[0-9]+', '') AS dst_layer, count(*) AS n
          FROM members GROUP BY ALL),
        layer_share AS (
          SELECT k.circuit_a, k.circuit_b,
                 sum(least(coalesce(x.n, 0), coalesce(y.n, 0)))
                   / sum(greatest(coalesce(x.n, 0), coalesce(y.n, 0))) AS layer_jaccard
          FROM (SELECT DISTINCT p.circuit_a, p.circuit_b, f.src_layer, f.dst_layer
                FROM pairs p JOIN profile f ON f.circuit_id IN (p.circuit_a, p.circuit_b)) k
          LEFT JOIN profile x ON x.circuit_id = k.circuit_a AND x.src_layer = k.src_layer
            AND x.dst_layer = k.dst_layer
          LEFT JOIN profile y ON y.circuit_id = k.circuit_b AND y.src_layer = k.src_layer
            AND y.dst_layer = k.dst_layer
          GROUP BY k.circuit_a, k.circuit_b),
        scored AS (
          SELECT p.run_a, p.run_b,
            rank() OVER (PARTITION BY p.run_a, p.run_b ORDER BY i.score)
              + (count(*) OVER (PARTITION BY p.run_a, p.run_b, i.score) - 1) / 2 AS rank_a,
            rank() OVER (PARTITION BY p.run_a, p.run_b ORDER BY j.score)
              + (count(*) OVER (PARTITION BY p.run_a, p.run_b, j.score) - 1) / 2 AS rank_b
          FROM pairs p JOIN edges i ON i.run_id = p.run_a
          JOIN edges j ON j.run_id = p.run_b AND j.src = i.src AND j.dst = i.dst),
        correlated AS (
          SELECT run_a, run_b, count(*) AS n_scored,
                 CASE WHEN NOT isnan(corr(rank_a, rank_b)) THEN corr(rank_a, rank_b) END
                   AS spearman
          FROM scored GROUP BY ALL),
        across AS (
          SELECT circuit_id, checkpoint_id, task_id, faithfulness FROM cross_recovery
          QUALIFY row_number() OVER (
            PARTITION BY circuit_id, checkpoint_id, task_id ORDER BY created_at DESC) = 1)
        SELECT p.group_id, p.task_id, p.method, p.step, p.model_a, p.model_b, p.run_a,
               p.run_b, p.circuit_a, p.circuit_b, p.checkpoint_a, p.checkpoint_b, p.edges_a,
               p.edges_b,
               coalesce(s.shared, 0) AS edges_shared,
               coalesce(s.shared, 0) / nullif(p.edges_a + p.edges_b - coalesce(s.shared, 0), 0)
                 AS edge_jaccard,
               n.nodes_a, n.nodes_b, n.nodes_shared,
               n.nodes_shared / nullif(n.nodes_a + n.nodes_b - n.nodes_shared, 0)
                 AS node_jaccard,
               l.layer_jaccard, c.n_scored, c.spearman,
               p.faithfulness_a, p.faithfulness_b,
               ab.faithfulness AS a_on_b, ba.faithfulness AS b_on_a
        FROM pairs p
        LEFT JOIN shared_edges s USING (circuit_a, circuit_b)
        LEFT JOIN node_counts n USING (circuit_a, circuit_b)
        LEFT JOIN layer_share l USING (circuit_a, circuit_b)
        LEFT JOIN correlated c USING (run_a, run_b)
        LEFT JOIN across ab ON ab.circuit_id = p.circuit_a AND ab.checkpoint_id = p.checkpoint_b
          AND ab.task_id = p.task_id
        LEFT JOIN across ba ON ba.circuit_id = p.circuit_b AND ba.checkpoint_id = p.checkpoint_a
          AND ba.task_id = p.task_id""",
]

# v15: why this token (`workbench run prompt --attribution`, `workbench.prompt.inputattr`): one
# prediction's input attribution by several methods, keyed by explanation_id (a hash of the
# checkpoint, the tokens, the target and the parameters), its faithfulness curves and the methods'
# agreement; Patchscope's decoded hidden states (keyed by patchscope_id); tuned lenses (trained
# like SAEs, `workbench run tuned-lens`) and their predictions on a prompt. `layer` in these
# tables is the residual stream before block `layer` (0: the embeddings, n_layers: the final
# one), as in prompt_routes; NULL is the input tokens themselves.
SCHEMA_V15 = [
    """CREATE TABLE prompt_explanations (
        explanation_id VARCHAR PRIMARY KEY, prompt_id VARCHAR, checkpoint_id VARCHAR,
        target_id INTEGER, target VARCHAR, target_logit DOUBLE, target_prob DOUBLE,
        baseline_logit DOUBLE, top_k INTEGER, params VARCHAR, created_at TIMESTAMP)""",
    """CREATE TABLE prompt_input_attr (
        explanation_id VARCHAR, method VARCHAR, layer INTEGER, position INTEGER, score DOUBLE)""",
    """CREATE TABLE prompt_attr_methods (
        explanation_id VARCHAR, method VARCHAR, seconds DOUBLE, total DOUBLE, delta DOUBLE,
        deletion_auc DOUBLE, insertion_auc DOUBLE, deletion_logit_auc DOUBLE,
        insertion_logit_auc DOUBLE)""",
    """CREATE TABLE prompt_attr_curves (
        explanation_id VARCHAR, method VARCHAR, kind VARCHAR, k INTEGER, prob DOUBLE,
        logit DOUBLE)""",
    """CREATE TABLE prompt_attr_agreement (
        explanation_id VARCHAR, method_a VARCHAR, method_b VARCHAR, spearman DOUBLE,
        top_k_share DOUBLE)""",
    """CREATE TABLE prompt_patchscopes (
        patchscope_id VARCHAR PRIMARY KEY, prompt_id VARCHAR, checkpoint_id VARCHAR,
        inspector_id VARCHAR, template VARCHAR, template_ids INTEGER[], source_position INTEGER,
        target_layer INTEGER, new_tokens INTEGER, created_at TIMESTAMP)""",
    """CREATE TABLE prompt_patchscope (
        patchscope_id VARCHAR, source_layer INTEGER, target_layer INTEGER, token_ids INTEGER[],
        text VARCHAR)""",
    """CREATE TABLE tuned_lenses (
        lens_id VARCHAR PRIMARY KEY, model_id VARCHAR, checkpoint_id VARCHAR, path VARCHAR,
        params VARCHAR, corpus VARCHAR, n_tokens BIGINT, created_at TIMESTAMP)""",
    """CREATE TABLE lens_metrics (lens_id VARCHAR, layer INTEGER, metric VARCHAR, value DOUBLE)""",
    """CREATE TABLE prompt_tuned_lens (
        prompt_id VARCHAR, lens_id VARCHAR, layer INTEGER, position INTEGER, rank INTEGER,
        token_id INTEGER, token VARCHAR, prob DOUBLE)""",
]

MIGRATIONS: dict[int, list[str]] = {
    1: SCHEMA_V1,
    2: SCHEMA_V2,
    3: SCHEMA_V3,
    4: SCHEMA_V4,
    5: SCHEMA_V5,
    6: SCHEMA_V6,
    7: SCHEMA_V7,
    8: SCHEMA_V8,
    9: SCHEMA_V9,
    10: SCHEMA_V10,
    11: SCHEMA_V11,
    12: SCHEMA_V12,
    13: SCHEMA_V13,
    14: SCHEMA_V14,
    15: SCHEMA_V15,
}
SCHEMA_VERSION = max(MIGRATIONS)

# The tables of a prompt's views besides `prompt_views` itself, keyed by prompt_id.
PROMPT_TABLES = (
    "prompt_attention",
    "prompt_logit_lens",
    "prompt_dla",
    "prompt_flow",
    "prompt_routes",
)

# The tables of a catalogue besides `catalogues` itself, keyed by catalogue_id.
CATALOGUE_TABLES = ("head_catalogue", "head_composition", "head_mappings")

# The tables of an explanation besides `prompt_explanations` itself, keyed by explanation_id.
EXPLANATION_TABLES = (
    "prompt_input_attr",
    "prompt_attr_methods",
    "prompt_attr_curves",
    "prompt_attr_agreement",
)

# The tables of a graph besides `graphs` itself, keyed by graph_id.
GRAPH_TABLES = ("graph_nodes", "graph_edges")
