"""Task files against sizes and paths: a huge line is refused after reading only the line limit
of it (before it is parsed or tokenized), an id list longer than the context is named, and a
path the system cannot open is one sentence naming it and why (exit 2 from the command line)."""

import json
import re
import tracemalloc
from pathlib import Path

import pytest

from tests.conftest import write_jsonl
from workbench.cli import cli
from workbench.errors import BadInput
from workbench.tasks import load_task
from workbench.tasks.jsonl import LINE_LIMIT_ENV, line_limit, read_task_file

GOOD = json.dumps({"clean": "apple", "corrupt": "stone", "answer": " river", "wrong": " stone"})


def _huge_line_file(path: Path, n_bytes: int) -> Path:
    """A good line, then a text-form line whose `clean` prompt is `n_bytes` long, written in
    pieces (the test holds none of it whole)."""
    piece = "apple river " * 10_000
    with path.open("w") as fh:
        fh.write(GOOD + "\n" + '{"corrupt": "stone", "clean": "')
        for _ in range(n_bytes // len(piece)):
            fh.write(piece)
        fh.write('", "answer": " river", "wrong": " stone"}\n')
    return path


def test_a_42_mb_line_is_refused_having_read_only_the_limit(tmp_path, induction_final):
    path = _huge_line_file(tmp_path / "big.jsonl", 42_000_000)
    limit = line_limit(induction_final)
    tracemalloc.start()
    try:
        with pytest.raises(BadInput) as refused:
            load_task(str(path), induction_final)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(refused.value) == (
        f"{path}:2: field 'clean' makes the line longer than {limit:,} characters (the limit "
        f"for this model's context; set {LINE_LIMIT_ENV} to change it)"
    )
    assert peak < 4_000_000  # the line is read up to the limit, a few KB, not 42 MB


def test_the_default_limit_follows_the_context(induction_final):
    n_ctx = induction_final.model.cfg.n_ctx
    assert line_limit(induction_final) == max(4096, 64 * n_ctx)


def test_the_line_limit_is_a_setting_and_counts_characters(tmp_path, induction_final, monkeypatch):
    path = write_jsonl(tmp_path / "t.jsonl", [GOOD, GOOD])
    n_chars = len(GOOD)
    monkeypatch.setenv(LINE_LIMIT_ENV, str(n_chars))  # exactly as long as a line: it loads
    assert len(load_task(str(path), induction_final).pairs) == 2
    monkeypatch.setenv(LINE_LIMIT_ENV, str(n_chars - 1))
    with pytest.raises(BadInput, match=r"t\.jsonl:1: field 'wrong' makes the line longer than"):
        load_task(str(path), induction_final)
    monkeypatch.setenv(LINE_LIMIT_ENV, "4")  # cut inside the first key: no field to name yet
    with pytest.raises(BadInput, match=r"t\.jsonl:1: the line is longer than 4 characters"):
        load_task(str(path), induction_final)
    monkeypatch.setenv(LINE_LIMIT_ENV, "lots")
    with pytest.raises(BadInput, match=rf"{LINE_LIMIT_ENV}='lots': expected a positive number"):
        load_task(str(path), induction_final)
    monkeypatch.delenv(LINE_LIMIT_ENV)
    with pytest.raises(BadInput, match=r"t\.jsonl:1: field 'corrupt' makes the line longer"):
        read_task_file(path, induction_final, max_line_chars=30)


def test_ids_longer_than_the_context_name_the_field(tmp_path, induction_final):
    n_ctx = induction_final.model.cfg.n_ctx
    ids = [1] * (n_ctx + 1)
    line = json.dumps({"clean_ids": [1, 2], "corrupt_ids": ids, "answer_id": 3, "wrong_id": 4})
    path = write_jsonl(tmp_path / "ids.jsonl", [line])
    message = rf"ids\.jsonl:1: field 'corrupt_ids' has {n_ctx + 1} token ids, more than the "
    with pytest.raises(BadInput, match=message + rf"context \({n_ctx}\)"):
        load_task(str(path), induction_final)
    words = " ".join(["apple"] * (n_ctx + 3))
    line = json.dumps({"clean": words, "corrupt": words, "answer": " river", "wrong": " stone"})
    path = write_jsonl(tmp_path / "text.jsonl", [line])
    message = rf"text\.jsonl:1: field 'clean' is {n_ctx + 4} tokens, longer than the context"
    with pytest.raises(BadInput, match=message):
        load_task(str(path), induction_final)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        (lambda tmp: tmp / ("x" * 300 + ".jsonl"), r"\.\.\.x{34}\.jsonl \([\d,]+ characters\)"),
        (lambda tmp: "x" * 300, r"^x{60}\.\.\.x{40} \(300 characters\)"),  # a bare name
        (lambda tmp: tmp / "/".join(["deep"] * 1200), r"deep/deep \([\d,]+ characters\)"),
    ],
    ids=["long-name", "long-bare-name", "long-path"],
)
def test_a_path_too_long_for_the_system_is_named_with_the_reason(
    tmp_path, induction_final, path, message
):
    with pytest.raises(BadInput, match=message + r": cannot open the task file \(File name too"):
        load_task(str(path(tmp_path)), induction_final)


def test_other_unreadable_paths_are_one_sentence(tmp_path, induction_final):
    with pytest.raises(BadInput, match=r": not a task file \(a directory"):
        load_task(str(tmp_path), induction_final)
    (tmp_path / "latin1.jsonl").write_bytes(
        GOOD.encode() + b"\n" + '{"clean": "é"}'.encode("latin-1")
    )
    with pytest.raises(BadInput, match=r"latin1\.jsonl:2: not UTF-8 text"):
        load_task(str(tmp_path / "latin1.jsonl"), induction_final)
    with pytest.raises(BadInput, match=r"~no-such-user-here/t\.jsonl: cannot expand the path"):
        load_task("~no-such-user-here/t.jsonl", induction_final)
    with pytest.raises(BadInput, match=r"a\\x00b\.jsonl: (task file not found|cannot open)"):
        load_task(str(tmp_path / "a\x00b.jsonl"), induction_final)


def test_the_command_line_says_so_with_exit_2(tmp_path, induction_dir, capsys):
    db = tmp_path / "w.duckdb"
    argv = ["run", "heads", "--model", str(induction_dir), "--checkpoint", "latest"]
    argv += ["--method", "dla", "--db", str(db), "--task", str(tmp_path / ("t" * 300))]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    assert re.search(r"characters\): cannot open the task file \(File name too long\)$", line)
    assert "Traceback" not in err
