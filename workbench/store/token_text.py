"""Rewriting a checkpoint's stored token strings from the token ids stored beside them (schema
v11: `token_text_pending` lists the checkpoints still to do). The store cannot load a tokenizer;
the caller decodes the ids this module lists (`workbench.token_text` does both).

The strings rewritten: `prompt_views.tokens` and `.predicted`, `prompt_logit_lens.token`,
`graphs.tokens` and the token and logit nodes' `graph_nodes.token` (graphs computed here;
an imported graph keeps the strings of its file), `feature_examples.tokens`, and the `token`
of every entry of `features.top_logits` / `.bottom_logits`. Each table's new strings are made
in Arrow (a lookup by id over all its rows at once) and written by one `UPDATE ... FROM` on
the rows' `rowid`: a SQL lookup per string is thousands of times slower on the hundred
million strings of a SmolLM2 transcoder set's examples.
"""

import json
from typing import Any

import numpy as np
import pyarrow as pa

from workbench.store.db import Store

_PROMPTS = "SELECT prompt_id FROM prompt_views WHERE checkpoint_id = $c"
_GRAPHS = (
    "SELECT graph_id FROM graphs WHERE checkpoint_id = $c "
    "AND json_extract_string(params, '$.imported_from') IS NULL"
)
_SAES = "SELECT sae_id FROM saes WHERE checkpoint_id = $c"
_LOGIT = '[{"id": "INTEGER"}]'
LOGIT_COLUMNS = ("top_logits", "bottom_logits")  # of `features`

# (table, its rows of the checkpoint, id column, string column): list columns, then scalar
# ones. Feature examples are rewritten one SAE at a time (a SmolLM2 set's hold 88 million).
_LISTS = [
    ("prompt_views", "checkpoint_id = $c", "token_ids", "tokens"),
    ("graphs", f"graph_id IN ({_GRAPHS})", "token_ids", "tokens"),
    ("feature_examples", f"sae_id IN ({_SAES})", "token_ids", "tokens"),
]
_SCALARS = [
    ("prompt_views", "checkpoint_id = $c", "predicted_id", "predicted"),
    ("prompt_logit_lens", f"prompt_id IN ({_PROMPTS})", "token_id", "token"),
    ("graph_nodes", f"graph_id IN ({_GRAPHS}) AND kind IN ('token', 'logit')", "token_id", "token"),
]
_IDS = (
    "SELECT DISTINCT id FROM ("
    + " UNION ALL ".join(
        [f"SELECT unnest({ids}) AS id FROM {t} WHERE {where}" for t, where, ids, _ in _LISTS]
        + [f"SELECT {ids} FROM {t} WHERE {where}" for t, where, ids, _ in _SCALARS]
        + [
            f"SELECT unnest(list_transform(from_json({c}, '{_LOGIT}'), lambda e: e.id)) "
            f"FROM features WHERE sae_id IN ({_SAES})"
            for c in LOGIT_COLUMNS
        ]
    )
    + ") WHERE id IS NOT NULL ORDER BY id"
)


def pending(store: Store) -> list[tuple[str, str | None]]:
    """(checkpoint_id, where it was loaded from: `checkpoints.path`) of each checkpoint whose
    stored token strings are still its tokenizer's pieces."""
    rows = store.con.execute(
        """SELECT p.checkpoint_id, c.path FROM token_text_pending p
           LEFT JOIN checkpoints c USING (checkpoint_id) ORDER BY p.checkpoint_id"""
    ).fetchall()
    return [(str(r[0]), None if r[1] is None else str(r[1])) for r in rows]


def token_ids(store: Store, checkpoint_id: str) -> list[int]:
    """Every token id whose string a row of the checkpoint stores, ascending."""
    return [int(r[0]) for r in store.con.execute(_IDS, {"c": checkpoint_id}).fetchall()]


def rewrite(store: Store, checkpoint_id: str, texts: dict[int, str] | None) -> None:
    """Set every stored string of the checkpoint's tokens to `texts[id]`, and take the
    checkpoint off the pending list, in one transaction. `texts` None: the strings stay as
    they are (a model without a tokenizer stores its ids as strings either way)."""
    with store.transaction() as con:
        if texts:
            _rewrite_all(con, {"c": checkpoint_id}, texts)
        con.execute("DELETE FROM token_text_pending WHERE checkpoint_id = ?", [checkpoint_id])


def _rewrite_all(con: Any, params: dict[str, str], texts: dict[int, str]) -> None:
    dense: list[str | None] = [None] * (max(texts) + 1)
    for i, text in texts.items():
        dense[i] = text
    lookup = pa.array(dense, pa.string())
    saes = [str(r[0]) for r in con.execute(_SAES, params).fetchall()]
    for table, where, ids, strings in _LISTS:
        parts = [("sae_id = $sae", {"sae": sae}) for sae in saes]
        for part_where, part in parts if table == "feature_examples" else [(where, params)]:
            sql = f"SELECT rowid AS rid, {ids} FROM {table} WHERE {part_where}"
            rows = _rows(con, sql, part)
            if rows.num_rows:
                lists = rows.column(ids).combine_chunks()
                flat = pa.array(lists.flatten().to_numpy(zero_copy_only=False), pa.int64())
                made = pa.ListArray.from_arrays(
                    lists.offsets, lookup.take(flat), mask=lists.is_null()
                )
                _update(con, table, rows.column("rid"), strings, made)
    for table, where, ids, strings in _SCALARS:
        sql = f"SELECT rowid AS rid, {ids} FROM {table} WHERE {where} AND {ids} IS NOT NULL"
        rows = _rows(con, sql, params)
        if rows.num_rows:
            index = rows.column(ids).to_numpy().astype(np.int64)
            _update(con, table, rows.column("rid"), strings, lookup.take(index))
    for column in LOGIT_COLUMNS:
        sql = (
            f"SELECT rowid AS rid, {column} AS logits FROM features "
            f"WHERE sae_id IN ({_SAES}) AND {column} IS NOT NULL"
        )
        rows = _rows(con, sql, params)
        if rows.num_rows:
            made = [_logits(raw, texts) for raw in rows.column("logits").to_pylist()]
            _update(con, "features", rows.column("rid"), column, pa.array(made, pa.string()))


def _rows(con: Any, sql: str, params: dict[str, str]) -> pa.Table:
    return con.sql(sql, params=params).to_arrow_table()


def _logits(raw: str, texts: dict[int, str]) -> str:
    """A `features.top_logits` / `.bottom_logits` value (a JSON list of {"token", "id",
    "value"}) with each token's text."""
    entries = json.loads(raw)
    for e in entries:
        e["token"] = texts.get(int(e["id"]), e["token"])
    return json.dumps(entries)


def _update(con: Any, table: str, rid: Any, column: str, values: Any) -> None:
    con.register("token_text_new", pa.table({"rid": rid, "value": values}))
    try:
        con.execute(
            f"UPDATE {table} SET {column} = n.value FROM token_text_new n "
            f"WHERE {table}.rowid = n.rid"
        )
    finally:
        con.unregister("token_text_new")
