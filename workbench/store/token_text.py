"""Rewriting a checkpoint's stored token strings from the token ids stored beside them (schema
v11: `token_text_pending` lists the checkpoints still to do). The store cannot load a tokenizer;
the caller decodes the ids this module lists (`workbench.token_text` does both).

The strings rewritten: `prompt_views.tokens` and `.predicted`, `prompt_logit_lens.token`,
`graphs.tokens` and the token and logit nodes' `graph_nodes.token` (graphs computed here;
an imported graph keeps the strings of its file), `feature_examples.tokens`, and the `token`
of every entry of `features.top_logits` / `.bottom_logits`.
"""

import pyarrow as pa

from workbench.store.db import Store

_PROMPTS = "SELECT prompt_id FROM prompt_views WHERE checkpoint_id = $c"
_GRAPHS = (
    "SELECT graph_id FROM graphs WHERE checkpoint_id = $c "
    "AND json_extract_string(params, '$.imported_from') IS NULL"
)
_SAES = "SELECT sae_id FROM saes WHERE checkpoint_id = $c"
_LOGIT = '[{"token": "VARCHAR", "id": "INTEGER", "value": "DOUBLE"}]'
_TEXT = "getvariable('token_text')"


def _logit_ids(column: str) -> str:
    return (
        f"SELECT unnest(list_transform(from_json({column}, '{_LOGIT}'), lambda e: e.id)) "
        f"FROM features WHERE sae_id IN ({_SAES})"
    )


def _logit_texts(column: str) -> str:
    return (
        f"UPDATE features SET {column} = to_json(list_transform(from_json({column}, '{_LOGIT}'), "
        f"lambda e: {{'token': {_TEXT}[e.id], 'id': e.id, 'value': e.value}})) "
        f"WHERE sae_id IN ({_SAES}) AND {column} IS NOT NULL"
    )


_IDS = f"""SELECT DISTINCT id FROM (
    SELECT unnest(token_ids) AS id FROM prompt_views WHERE checkpoint_id = $c
    UNION ALL SELECT predicted_id FROM prompt_views WHERE checkpoint_id = $c
    UNION ALL SELECT token_id FROM prompt_logit_lens WHERE prompt_id IN ({_PROMPTS})
    UNION ALL SELECT unnest(token_ids) FROM graphs WHERE graph_id IN ({_GRAPHS})
    UNION ALL SELECT token_id FROM graph_nodes WHERE graph_id IN ({_GRAPHS})
    UNION ALL SELECT unnest(token_ids) FROM feature_examples WHERE sae_id IN ({_SAES})
    UNION ALL {_logit_ids("top_logits")}
    UNION ALL {_logit_ids("bottom_logits")}
) WHERE id IS NOT NULL ORDER BY id"""

_REWRITES = [
    f"""UPDATE prompt_views SET tokens = list_transform(token_ids, lambda i: {_TEXT}[i]),
        predicted = {_TEXT}[predicted_id] WHERE checkpoint_id = $c""",
    f"UPDATE prompt_logit_lens SET token = {_TEXT}[token_id] WHERE prompt_id IN ({_PROMPTS})",
    f"""UPDATE graphs SET tokens = list_transform(token_ids, lambda i: {_TEXT}[i])
        WHERE graph_id IN ({_GRAPHS})""",
    f"""UPDATE graph_nodes SET token = {_TEXT}[token_id]
        WHERE graph_id IN ({_GRAPHS}) AND kind IN ('token', 'logit') AND token_id IS NOT NULL""",
    f"""UPDATE feature_examples SET tokens = list_transform(token_ids, lambda i: {_TEXT}[i])
        WHERE sae_id IN ({_SAES})""",
    _logit_texts("top_logits"),
    _logit_texts("bottom_logits"),
]


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
            table = pa.table(
                {
                    "id": pa.array(list(texts), pa.int32()),
                    "text": pa.array(list(texts.values()), pa.string()),
                }
            )
            con.register("token_text_new", table)
            try:
                con.execute(
                    "SET VARIABLE token_text = "
                    "(SELECT map(list(id), list(text)) FROM token_text_new)"
                )
                for statement in _REWRITES:
                    con.execute(statement, {"c": checkpoint_id})
            finally:
                con.execute("RESET VARIABLE token_text")
                con.unregister("token_text_new")
        con.execute("DELETE FROM token_text_pending WHERE checkpoint_id = ?", [checkpoint_id])
