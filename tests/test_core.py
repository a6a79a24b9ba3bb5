"""The vocabulary's owner: node ids round-trip, hooks name real TransformerLens hooks, and the
stored `nodes` rows (and the v5 migration of older ones) agree with `Node`."""

import duckdb
import pytest

from workbench.core import PORTS, QKV, Hook, Node
from workbench.rows import feature_node_rows, model_graph_nodes
from workbench.store import Store


def test_every_stored_node_id_round_trips_with_its_columns():
    table = model_graph_nodes("m", n_layers=3, n_heads=4, has_mlp=True)
    rows = table.to_pylist() + feature_node_rows("m", "s1", "h", 1, 5).to_pylist()
    for row in rows:
        node = Node.parse(row["node_id"])
        assert node.id == row["node_id"]
        assert node.kind == row["kind"]
        assert (node.head, node.port, node.sae_id, node.feature) == (
            row["head"],
            row["port"],
            row["sae_id"],
            row["feature"],
        )
        if node.kind not in ("logits", "feature", "sae_error", "input"):
            assert node.layer == row["layer"]
    ids = {row["node_id"] for row in rows}
    assert {"input", "logits", "r3", "a2", "m0", "a1.h3", "a1.h3<pattern>"} <= ids
    assert {"f:s1:4", "f:s1:err"} <= ids
    assert len(ids) == len(rows)  # no two nodes share an id


@pytest.mark.parametrize(
    ("node_id", "expected"),
    [
        ("a0.h1<k>", Node("attn_head", 0, 1, "k")),
        ("a12.h0", Node("attn_head", 12, 0)),
        ("m3", Node("mlp", 3)),
        ("r0", Node("resid", 0)),
        ("a4", Node("attn", 4)),
        ("f:L0-resid:17", Node("feature", sae_id="L0-resid", feature=17)),
        ("f:a:b:err", Node("sae_error", sae_id="a:b")),
    ],
)
def test_parse_reads_each_form(node_id, expected):
    assert Node.parse(node_id) == expected
    assert expected.id == node_id


@pytest.mark.parametrize("bad", ["", "a1.h", "a1.h2<x>", "x3", "f:s", "f:s:", "logit", "m-1"])
def test_parse_rejects_what_is_not_an_id(bad):
    with pytest.raises(ValueError, match="not a node id"):
        Node.parse(bad)
    assert Node.try_parse(bad) is None


@pytest.fixture
def tiny_gpt2():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=32, n_ctx=8, d_vocab=20,
        act_fn="gelu", normalization_type="LN", device="cpu",
    )  # fmt: skip
    return HookedTransformer(cfg)


def test_hooks_of_nodes_are_hooks_of_a_real_model(tiny_gpt2):
    """Every hook name `Node` and `Hook` produce exists in a TransformerLens model with split
    q/k/v inputs and `hook_mlp_in` on."""
    model = tiny_gpt2
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    try:
        n = model.cfg.n_layers
        names = set(model.hook_dict)
        for layer in range(n):
            for port in QKV:
                assert Node.head_of(layer, 0, port).in_hook(n) in names
                assert Hook.qkv(layer, port) in names
            for node in (Node.mlp(layer), Node.head_of(layer, 1), Node.attn(layer)):
                assert node.out_hook() in names
            assert Node.mlp(layer).in_hook(n) in names
            for hook in (Hook.resid_pre, Hook.resid_mid, Hook.resid_post, Hook.pattern):
                assert hook(layer) in names
                assert Hook.layer(hook(layer)) == layer
        assert Node.logits().in_hook(n) in names and Node.input().out_hook() in names
        assert {Hook.EMBED, Hook.POS_EMBED, Hook.FINAL_SCALE} <= names
    finally:
        model.set_use_split_qkv_input(False)
        model.set_use_hook_mlp_in(False)


def test_depth_orders_hooks_along_the_forward_pass():
    order = [Hook.resid_pre(0), Hook.z(0), Hook.attn_out(0), Hook.resid_mid(0)]
    order += [Hook.mlp_out(0), Hook.resid_post(0), Hook.resid_pre(1), Hook.FINAL_SCALE]
    depths = [Hook.depth(h, n_layers=2) for h in order]
    assert depths == sorted(depths) and depths[-1] == 2.0
    assert Hook.depth(Hook.resid_post(0), 2) == Hook.depth(Hook.resid_pre(1), 2)
    assert Hook.stop_layer(Hook.resid_post(1)) == 2 and Hook.stop_layer(Hook.EMBED) is None


def test_v5_migration_fills_ports_of_stored_nodes(tmp_path):
    """A v4 database's head port nodes get `port` from their ids; other nodes get NULL."""
    from workbench.store.schema import MIGRATIONS

    db = tmp_path / "v4.duckdb"
    con = duckdb.connect(str(db))
    con.execute("CREATE TABLE schema_version (version INTEGER, applied_at TIMESTAMP)")
    for version in range(1, 5):
        for statement in MIGRATIONS[version]:
            con.execute(statement)
        con.execute("INSERT INTO schema_version VALUES (?, current_timestamp)", [version])
    old = model_graph_nodes("m", 2, 3, True).drop_columns(["port"])
    features = feature_node_rows("m", "s", "h", 0, 2).drop_columns(["port"])
    for table in (old, features):
        con.register("incoming", table)
        con.execute("INSERT INTO nodes SELECT * FROM incoming")
        con.unregister("incoming")
    con.close()
    with Store(db) as store:
        rows = store.query("SELECT node_id, port FROM nodes").to_pylist()
    assert len(rows) == old.num_rows + features.num_rows
    for row in rows:
        assert row["port"] == Node.parse(row["node_id"]).port
    assert {r["port"] for r in rows} == {None, *PORTS}
