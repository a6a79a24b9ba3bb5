"""Schema v1 (DESIGN.md, "DuckDB schema") and forward migrations.

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

MIGRATIONS: dict[int, list[str]] = {
    1: SCHEMA_V1,
    2: SCHEMA_V2,
    3: SCHEMA_V3,
    4: SCHEMA_V4,
    5: SCHEMA_V5,
}
SCHEMA_VERSION = max(MIGRATIONS)

# Tables every run writes rows into, keyed by run_id (deleted together on --force re-runs).
RUN_TABLES = (
    "node_scores",
    "edges",
    "faithfulness_curves",
    "run_metrics",
    "saes",
    "features",
    "feature_examples",
)
