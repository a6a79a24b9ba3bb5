"""Stored token strings are each token's text as its tokenizer decodes it alone (" Paris"), not
the tokenizer's piece ("ĠParis"), on a model with a byte-level BPE tokenizer like GPT-2's and
SmolLM2's; and a schema v10 database, which stored the pieces, is rewritten from the stored
token ids by the next run or `workbench migrate`."""

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.sae.conftest import query
from workbench.cli import cli
from workbench.store import Store
from workbench.store.schema import MIGRATIONS, SCHEMA_VERSION

TEXT = "The capital of France is Paris.\nThe capital of Italy is Rome.\n"
# the merges make whole-word tokens of these; every other word stays in single bytes
GRAPH_PROMPT = "Rome.\nThe capital of France is"
WORDS = ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis", "ĠParis", "ĠItaly", "ĠRome"]


def _byte_level_tokenizer(out: Path):  # type: ignore[no-untyped-def]
    """GPT-2's scheme: the 256 byte characters (space is `Ġ`, newline `Ċ`) and BPE merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|endoftext|>": 0} | {c: i + 1 for i, c in enumerate(alphabet)}
    merges = []
    for word in WORDS:
        for end in range(2, len(word) + 1):
            left, right = word[: end - 1], word[end - 1]
            if (left, right) not in merges:
                merges.append((left, right))
            vocab.setdefault(word[:end], len(vocab))
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )
    tokenizer.save_pretrained(str(out))
    return tokenizer


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random two-layer GPT-2 with the byte-level tokenizer above."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    out = tmp_path_factory.mktemp("byte-level") / "model"
    tokenizer = _byte_level_tokenizer(out)
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=len(tokenizer), n_positions=64,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    GPT2LMHeadModel(config).eval().save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory, byte_model: Path) -> Path:
    """A transcoder set with its features and examples, an attribution graph, and a prompt's
    views, stored for the model above."""
    tmp = tmp_path_factory.mktemp("token-text")
    corpus = tmp / "corpus.txt"
    corpus.write_text(TEXT * 60)
    task = tmp / "task.jsonl"
    pair = {"clean": "The capital of France is", "corrupt": "The capital of Italy is"}
    task.write_text(json.dumps(pair | {"answer": " Paris", "wrong": " Rome"}) + "\n")
    db = tmp / "w.duckdb"
    argv = ["run", "transcoders", "--model", str(byte_model), "--task", str(task)]
    argv += ["--corpus", str(corpus), "--corpus-tokens", "600", "--context-size", "24"]
    argv += ["--training-tokens", "2400", "--transcoder-dir", str(tmp / "sets"), "--db", str(db)]
    assert cli(argv) == 0
    (set_id,) = [r["set_id"] for r in query(db, "SELECT set_id FROM transcoder_sets")]
    argv = ["run", "graph", "--model", str(byte_model), "--transcoders", set_id]
    assert cli([*argv, "--text", GRAPH_PROMPT, "--db", str(db)]) == 0
    argv = ["run", "prompt", "--model", str(byte_model), "--text", "The capital of France is"]
    assert cli([*argv, "--db", str(db)]) == 0
    return db


def _strings(db: Path) -> dict[str, list]:
    """Every stored token string with the token id it stands for, by where it is stored."""
    out: dict[str, list] = {}
    for r in query(db, "SELECT token_ids, tokens, predicted_id, predicted FROM prompt_views"):
        out.setdefault("prompt_views", []).extend(zip(r["token_ids"], r["tokens"], strict=True))
        out["prompt_views"].append((r["predicted_id"], r["predicted"]))
    for r in query(db, "SELECT token_id, token FROM prompt_logit_lens"):
        out.setdefault("prompt_logit_lens", []).append((r["token_id"], r["token"]))
    for r in query(db, "SELECT token_ids, tokens FROM graphs"):
        out.setdefault("graphs", []).extend(zip(r["token_ids"], r["tokens"], strict=True))
    for r in query(db, "SELECT token_id, token FROM graph_nodes WHERE token_id IS NOT NULL"):
        out.setdefault("graph_nodes", []).append((r["token_id"], r["token"]))
    for r in query(db, "SELECT token_ids, tokens FROM feature_examples"):
        out.setdefault("feature_examples", []).extend(zip(r["token_ids"], r["tokens"], strict=True))
    for r in query(db, "SELECT top_logits, bottom_logits FROM features"):
        for column in ("top_logits", "bottom_logits"):
            entries = json.loads(r[column]) if r[column] else []
            out.setdefault("features", []).extend((e["id"], e["token"]) for e in entries)
    return out


def test_token_texts_are_what_the_tokenizer_decodes_each_token_to(byte_model):
    from transformers import AutoTokenizer

    from workbench.models.base import token_texts

    tokenizer = AutoTokenizer.from_pretrained(str(byte_model))
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert "ĠParis" in pieces and "Ċ" in pieces
    texts = token_texts(tokenizer, ids)
    assert texts[pieces.index("ĠParis")] == " Paris" and texts[pieces.index("Ċ")] == "\n"
    assert "".join(texts) == TEXT  # ASCII: each token's text is its share of the text


def test_every_stored_token_string_is_that_tokens_text(stored, byte_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(byte_model))
    strings = _strings(stored)
    assert set(strings) == {
        "prompt_views", "prompt_logit_lens", "graphs", "graph_nodes", "feature_examples",
        "features",
    }  # fmt: skip
    for where, pairs in strings.items():
        for token_id, text in pairs:
            assert text == tokenizer.decode([token_id]), (where, token_id)
    graph_tokens = query(stored, "SELECT tokens FROM graphs")[0]["tokens"]
    assert graph_tokens == [
        "<|endoftext|>", "R", "o", "m", "e", ".", "\n", "The", " capital", " of", " France", " is",
    ]  # fmt: skip


def _as_v10(db: Path, tmp: Path, byte_model: Path) -> Path:
    """A copy of `db` as schema v10 left it: token strings are the tokenizer's pieces
    (`convert_ids_to_tokens`, what v10's runs stored) and no later version's tables."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(byte_model))
    from workbench.store.token_text import rewrite

    copy = tmp / "v10.duckdb"
    shutil.copy(db, copy)
    ids = sorted({i for pairs in _strings(copy).values() for i, _ in pairs})
    pieces = dict(zip(ids, tokenizer.convert_ids_to_tokens(ids), strict=True))
    with Store(copy) as store:
        store.con.execute("INSERT INTO token_text_pending SELECT checkpoint_id FROM checkpoints")
        (checkpoint_id,) = [r[0] for r in store.con.execute("FROM token_text_pending").fetchall()]
        rewrite(store, checkpoint_id, pieces)
        store.con.execute("DROP TABLE token_text_pending")
        for version in range(12, SCHEMA_VERSION + 1):  # what later versions created
            for statement in MIGRATIONS[version]:
                found = re.match(r"\s*CREATE (TABLE|VIEW) (\w+)", statement)
                if found:
                    store.con.execute(f"DROP {found.group(1)} {found.group(2)}")
                added = re.match(r"\s*ALTER TABLE (\w+) ADD COLUMN (\w+)", statement)
                if added:
                    store.con.execute(f"ALTER TABLE {added.group(1)} DROP COLUMN {added.group(2)}")
        store.con.execute("DELETE FROM schema_version WHERE version > 10")
    return copy


def test_a_v10_database_is_rewritten_by_workbench_migrate(stored, byte_model, tmp_path, capsys):
    v10 = _as_v10(stored, tmp_path, byte_model)
    before = _strings(v10)
    assert ("ĠParis" in {t for _, t in before["graph_nodes"]}) or any(
        t.startswith("Ġ") for _, t in before["graphs"]
    )
    assert before != _strings(stored)
    assert cli(["migrate", "--db", str(v10)]) == 0
    assert f"migrated from v10 to schema v{SCHEMA_VERSION}" in capsys.readouterr().out
    assert _strings(v10) == _strings(stored)
    assert query(v10, "SELECT count(*) AS n FROM token_text_pending")[0]["n"] == 0


def test_the_next_run_rewrites_a_v10_database(stored, byte_model, tmp_path):
    v10 = _as_v10(stored, tmp_path, byte_model)
    task = tmp_path / "task.jsonl"
    task.write_text(json.dumps({"clean_ids": [1, 2], "corrupt_ids": [1, 3], "answer_id": 4,
                                "wrong_id": 5}) + "\n")  # fmt: skip
    argv = ["run", "patching", "--model", str(byte_model), "--task", str(task), "--db", str(v10)]
    assert cli(argv) == 0
    assert _strings(v10) == _strings(stored)


def test_a_checkpoint_whose_tokenizer_is_gone_keeps_its_pieces(stored, byte_model, tmp_path):
    """Its strings stay as they are and it stays pending; the message names it."""
    v10 = _as_v10(stored, tmp_path, byte_model)
    with Store(v10) as store:
        store.con.execute("UPDATE checkpoints SET path = ?", [str(tmp_path / "gone")])
    before = _strings(v10)
    result = _migrate(v10)
    assert "keep their tokenizer's pieces" in result and "1 checkpoint(s)" in result
    assert _strings(v10) == before
    assert query(v10, "SELECT count(*) AS n FROM token_text_pending")[0]["n"] == 1


def _migrate(db: Path) -> str:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "workbench", "migrate", "--db", str(db)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return done.stdout + done.stderr


def test_an_imported_graph_keeps_the_strings_of_its_file(stored, tmp_path, capsys):
    """`workbench import graph` stores the file's strings; the rewrite leaves them."""
    exported = tmp_path / "g.json"
    (graph_id,) = [r["graph_id"] for r in query(stored, "SELECT graph_id FROM graphs")]
    copy = tmp_path / "w.duckdb"
    shutil.copy(stored, copy)
    capsys.readouterr()
    assert cli(["export", "graph", graph_id, "--db", str(copy)]) == 0
    document = json.loads(capsys.readouterr().out)
    shown = document["metadata"]["prompt_tokens"]
    assert shown[5:8] == [".", "⏎", "The"]  # circuit-tracer shows a newline as ⏎
    shown[1] = "a string of the file's own"
    exported.write_text(json.dumps(document))
    (checkpoint_id,) = [r["checkpoint_id"] for r in query(copy, "SELECT checkpoint_id FROM graphs")]
    argv = ["import", "graph", str(exported), "--checkpoint-id", checkpoint_id, "--db", str(copy)]
    assert cli(argv) == 0
    with Store(copy) as store:
        store.con.execute("INSERT INTO token_text_pending VALUES (?)", [checkpoint_id])
    assert cli(["migrate", "--db", str(copy)]) == 0
    imported = query(copy, "SELECT tokens FROM graphs WHERE params->>'imported_from' IS NOT NULL")
    ours = query(copy, "SELECT tokens FROM graphs WHERE params->>'imported_from' IS NULL")
    assert imported[0]["tokens"] == [
        *ours[0]["tokens"][:1],
        "a string of the file's own",
        *ours[0]["tokens"][2:],
    ]  # the file's strings, its ⏎ a newline again
