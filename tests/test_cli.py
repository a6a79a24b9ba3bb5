"""The command line: exit statuses, one-sentence errors, nothing stored changes on bad input."""

import json

import pytest

from tests.conftest import write_jsonl
from tests.store.test_store import counts
from workbench.cli import cli
from workbench.pipelines import heads


def run_dla(model_dir, db) -> list[str]:
    return ["run", "heads", "--model", str(model_dir), "--task", "induction", "--db", str(db),
            "--method", "dla"]  # fmt: skip


@pytest.fixture()
def filled_db(tmp_path, induction_dir):
    db = tmp_path / "w.duckdb"
    code = cli(run_dla(induction_dir, db))
    assert code == 0
    return db


def _last_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1] if err else ""


def test_help_on_every_command(capsys):
    for argv in (
        ["--help"],
        ["run", "--help"],
        ["sql", "--help"],
        ["app", "--help"],
        ["demo", "--help"],
        ["zoo", "train", "--help"],
    ):
        assert cli(argv) == 0
    assert "--checkpoint" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "{tmp}/missing/model"], "no such directory"),
        (["--model", "not-a-model-name"], "unknown model 'not-a-model-name'"),
        (["--task", "{tmp}/bad.jsonl"], "bad.jsonl:2: not valid JSON"),
        (
            ["--task", "{tmp}/lengths.jsonl"],
            "lengths.jsonl:1: clean and corrupt prompts tokenize to different lengths",
        ),
        (["--method", "nope"], "--method nope: not a heads method"),
        (["--checkpoint", "12345"], "--checkpoint 12345: no checkpoint at that step"),
    ],
)
def test_bad_input_exits_2_with_one_sentence_and_changes_nothing(
    tmp_path, filled_db, induction_dir, capsys, args, message
):
    write_jsonl(
        tmp_path / "bad.jsonl",
        [
            json.dumps({"clean_ids": [1, 2], "corrupt_ids": [1, 3], "answer_id": 4, "wrong_id": 5}),
            "{oops",
        ],
    )
    write_jsonl(
        tmp_path / "lengths.jsonl",
        [
            json.dumps(
                {
                    "clean": "apple river stone",
                    "corrupt": "apple",
                    "answer": " river",
                    "wrong": " stone",
                }
            )
        ],
    )
    base = {"--model": str(induction_dir), "--task": "induction"}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value.format(tmp=tmp_path)
    argv = ["run", "heads", "--db", str(filled_db), "--force"]
    for flag, value in base.items():
        argv += [flag, value]
    before = counts(filled_db)
    capsys.readouterr()
    assert cli(argv) == 2
    line = _last_error_line(capsys)
    assert line.startswith("error: ") and message in line
    assert "Traceback" not in capsys.readouterr().err
    assert counts(filled_db) == before


def test_user_jsonl_task_on_hf_model(tmp_path, tiny_hf_dirs, capsys):
    task = write_jsonl(
        tmp_path / "mine.jsonl",
        [
            json.dumps(
                {
                    "clean_ids": [5, 6, 7, 5],
                    "corrupt_ids": [8, 6, 7, 5],
                    "answer_id": 6,
                    "wrong_id": 9,
                }
            )
        ]
        * 4,
    )
    db = tmp_path / "w.duckdb"
    assert (
        cli(
            [
                "run",
                "heads",
                "--model",
                str(tiny_hf_dirs["gpt_neox"]),
                "--task",
                str(task),
                "--db",
                str(db),
            ]
        )
        == 0
    )
    n_methods = len(heads.METHODS)
    assert counts(db)["runs"] == n_methods
    assert counts(db)["node_scores"] == n_methods * 2 * 4  # layers x heads


def test_sql_formats(filled_db, capsys):
    sql = "SELECT method, count(*) AS n FROM runs GROUP BY method"
    assert cli(["sql", sql, "--db", str(filled_db)]) == 0
    table = capsys.readouterr().out
    assert "method" in table and "dla" in table and "(1 row)" in table
    assert cli(["sql", sql, "--db", str(filled_db), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"method": "dla", "n": 1}]
    assert cli(["sql", sql, "--db", str(filled_db), "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines() == ['"method","n"', '"dla",1']


def test_sql_is_read_only_and_sandboxed(filled_db, capsys):
    before = counts(filled_db)
    assert cli(["sql", "DELETE FROM runs", "--db", str(filled_db)]) == 2
    assert "SQL error" in _last_error_line(capsys)
    assert cli(["sql", "SELECT * FROM read_csv('/etc/hostname')", "--db", str(filled_db)]) == 2
    assert cli(["sql", "SELEC 1", "--db", str(filled_db)]) == 2
    assert counts(filled_db) == before


def test_run_failure_exits_1(tmp_path, induction_dir, monkeypatch, capsys):
    from workbench.attribution import heads as head_methods

    def broken(*args, **kwargs):
        raise FloatingPointError("diverged")

    monkeypatch.setattr(head_methods, "direct_logit_attribution", broken)
    db = tmp_path / "w.duckdb"
    code = cli(run_dla(induction_dir, db))
    assert code == 1
    assert "failed" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "heads", "--bogus"], "error: No such option: --bogus"),
        (["run", "nosuchpipeline", "--model", "m", "--task", "t"], "'nosuchpipeline' is not one"),
        (["run"], "error: Missing argument 'pipeline'"),
    ],
)
def test_usage_errors_exit_2_with_one_sentence(argv, message, capsys):
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


FINISHING = """
import atexit, sys, threading
from pathlib import Path
from workbench.cli import finish

out = Path(sys.argv[1])
kind = sys.argv[2]


go = threading.Event()


def shutting_down():  # called by the interpreter's own exit before it joins threads
    (out / "torn down").touch()
    go.set()


threading._register_atexit(shutting_down)
atexit.register(lambda: (out / "exit handlers ran").touch())
if kind == "daemon":
    threading.Thread(target=threading.Event().wait, daemon=True).start()  # waits for ever
else:  # alive until the interpreter's exit lets it end: it must be joined
    threading.Thread(target=lambda: (go.wait(), (out / "joined").touch())).start()
finish(3)
"""


@pytest.mark.parametrize("kind", ["daemon", "non-daemon"])
def test_finish_ends_the_process_at_once_unless_a_thread_must_be_joined(tmp_path, kind):
    """`finish` exits with the command's status after the exit handlers, without the
    interpreter's teardown, when only daemon threads are left (tqdm's monitor is one): the
    interpreter's exit would not wait for them either. A non-daemon thread is joined first."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", FINISHING, str(tmp_path), kind], timeout=120)
    assert done.returncode == 3
    assert (tmp_path / "exit handlers ran").exists()
    assert (tmp_path / "torn down").exists() == (kind == "non-daemon")
    assert (tmp_path / "joined").exists() == (kind == "non-daemon")
