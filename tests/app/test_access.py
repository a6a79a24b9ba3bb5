"""What the app lets its users do (`app/access.py`): read-only mode hides every write and every
process; the Prompt page's processes are bounded per server, timed out and drained; task files
only from allowed directories; text people typed is never Markdown. Driven with Streamlit's
AppTest (and headless Chromium for what the browser draws) on copies of a pipeline-filled
database, with real child processes."""

import hashlib
import os
import re
import shutil
import sys
import time
from pathlib import Path

import duckdb
import pytest
from streamlit.testing.v1 import AppTest

from workbench.app import access
from workbench.errors import BadInput

APP = str(Path(__file__).resolve().parents[2] / "app" / "main.py")
BOUND = 120.0  # seconds: the most any wait below lasts (it ends as soon as its state is seen)
SETTINGS = (
    access.READ_ONLY_ENV,
    access.MAX_PROCESSES_ENV,
    access.PROCESS_TIMEOUT_ENV,
    access.TASK_DIRS_ENV,
)
NASTY_NOTE = "[click](http://x.example/c)"
NASTY_LABEL = "![i](http://x.example/i.png)"


@pytest.fixture(autouse=True)
def _policy(monkeypatch):
    """Every test starts from the defaults, whatever the environment running the suite says."""
    for name in SETTINGS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture()
def db(heads_db, tmp_path) -> Path:
    copy = tmp_path / "w.duckdb"
    shutil.copy(heads_db, copy)
    return copy


def _open(db: Path, monkeypatch, params: dict, timeout: float = BOUND) -> AppTest:
    monkeypatch.setenv("WORKBENCH_DB", str(db))
    from workbench.app import data

    data.query.clear()
    at = AppTest.from_file(APP, default_timeout=timeout)
    at.query_params.update(params)
    return _ok(at.run())


def _ok(at: AppTest) -> AppTest:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at


def _count(db: Path, table: str) -> int:
    con = duckdb.connect(str(db), read_only=True)
    try:
        row = con.execute(f"SELECT count(*) FROM {table}").fetchone()
    finally:
        con.close()
    assert row is not None
    return int(row[0])


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _texts(at: AppTest, kind: str) -> list[str]:
    """The Markdown source of the page's elements of a kind."""
    return [str(e.value) for e in getattr(at, kind)]


def _shown(at: AppTest, kind: str) -> list[str]:
    """What the page's elements of a kind read as (`access.plain`'s escapes undone)."""
    return [re.sub(r"\\(.)", r"\1", t).replace("\u200b", "") for t in _texts(at, kind)]


def _analyse(at: AppTest, *, text: str = "", task: str = "", index: int = 0) -> AppTest:
    at.text_input(key="prompt_text").set_value(text)
    at.text_input(key="prompt_task").set_value(task)
    at.number_input(key="prompt_index").set_value(index)
    at = at.button(key="prompt_analyse").click().run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _wait_until(what: str, done, bound: float = BOUND) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + bound
    while not done():
        assert time.monotonic() < deadline, f"still waiting for {what} after {bound} s"
        time.sleep(0.1)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _id_task(path: Path) -> Path:
    """A JSONL task in token-id form for the zoo's induction model (62 tokens)."""
    line = '{"clean_ids": [1, 5, 9, 5], "corrupt_ids": [1, 7, 9, 5], "answer_id": 9, "wrong_id": 7}'
    path.write_text(line + "\n")
    return path


# -- the policy ------------------------------------------------------------------------------


def test_the_defaults_and_each_setting_read_from_the_environment(monkeypatch, tmp_path):
    first = access.policy()
    assert (first.read_only, first.max_processes, first.process_timeout) == (False, 2, 600.0)
    assert first.task_dirs == () and first.problems == {}
    monkeypatch.setenv(access.READ_ONLY_ENV, "true")
    monkeypatch.setenv(access.MAX_PROCESSES_ENV, "5")
    monkeypatch.setenv(access.PROCESS_TIMEOUT_ENV, "2.5")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.setenv(access.TASK_DIRS_ENV, f"{tmp_path / 'a'}{os.pathsep}{tmp_path / 'b'}")
    now = access.policy()
    assert (now.read_only, now.max_processes, now.process_timeout) == (True, 5, 2.5)
    assert now.task_dirs == (tmp_path.resolve() / "a", tmp_path.resolve() / "b")
    assert now.problems == {}


@pytest.mark.parametrize(
    ("name", "value", "safe"),
    [
        (access.READ_ONLY_ENV, "maybe", ("read_only", True)),
        (access.MAX_PROCESSES_ENV, "0", ("max_processes", 0)),
        (access.MAX_PROCESSES_ENV, "two", ("max_processes", 0)),
        (access.PROCESS_TIMEOUT_ENV, "nan", ("process_timeout", 0.0)),
        (access.PROCESS_TIMEOUT_ENV, "-1", ("process_timeout", 0.0)),
        (access.TASK_DIRS_ENV, "/no/such/dir", ("task_dirs", ())),
    ],
)
def test_a_bad_setting_is_one_sentence_and_takes_the_safe_value(monkeypatch, name, value, safe):
    monkeypatch.setenv(name, value)
    now = access.policy()
    assert getattr(now, safe[0]) == safe[1]
    (sentence,) = now.problems.values()
    assert sentence.startswith(name) and value in sentence and "\n" not in sentence


def test_a_bad_read_only_value_keeps_the_app_read_only_and_says_so(db, monkeypatch):
    monkeypatch.setenv(access.READ_ONLY_ENV, "yes please")
    at = _open(db, monkeypatch, {"view": "circuit", "method": "eap", "k": "5"})
    with pytest.raises(KeyError):
        at.button(key="curate_save")
    assert any("yes please" in c and "stays read-only" in c for c in _shown(at, "caption"))


def test_the_built_in_task_names_are_the_library_s():
    from workbench.tasks.builtin import BUILTIN_TASKS

    assert set(access.BUILTIN_TASKS) == set(BUILTIN_TASKS)


# -- read-only mode --------------------------------------------------------------------------


def test_read_only_hides_the_subgraph_save_and_the_analyse_button(db, monkeypatch):
    before = _digest(db)
    monkeypatch.setenv(access.READ_ONLY_ENV, "1")
    at = _open(db, monkeypatch, {"view": "circuit", "method": "eap", "k": "5"})
    pins = at.multiselect(key="curate_pins").options[:2]
    at = _ok(at.multiselect(key="curate_pins").set_value(pins).run())  # curating still works
    with pytest.raises(KeyError):
        at.button(key="curate_save")
    with pytest.raises(KeyError):
        at.text_input(key="curate_name")
    assert any("Saving a subgraph is off" in c for c in _shown(at, "caption"))

    at = _ok(at.sidebar.radio(key="view").set_value("Prompt").run())
    with pytest.raises(KeyError):
        at.button(key="prompt_analyse")
    assert any("Analysing a prompt is off" in c for c in _shown(at, "caption"))
    started = access.launcher().started
    assert access.launch(["true"], what="A process") is None  # (outside a page: no caption)
    assert access.launcher().started == started
    assert _digest(db) == before
    assert _count(db, "subgraphs") == 0 and _count(db, "prompt_views") == 0


# -- task files ------------------------------------------------------------------------------


def test_check_task_takes_built_in_names_and_files_inside_the_allowed_dirs(monkeypatch, tmp_path):
    allowed = tmp_path / "tasks"
    allowed.mkdir()
    inside = _id_task(allowed / "mine.jsonl")
    outside = _id_task(tmp_path / "elsewhere.jsonl")
    (allowed / "link.jsonl").symlink_to(outside)
    (allowed / "dir").mkdir()
    with pytest.raises(BadInput, match="reads no task file"):
        access.check_task(str(inside))  # no directory allowed: files are off
    monkeypatch.setenv(access.TASK_DIRS_ENV, str(allowed))
    assert access.check_task(" induction ") == "induction"
    assert access.check_task(str(inside)) == str(inside.resolve())
    assert access.check_task("mine.jsonl") == str(inside.resolve())  # found in the allowed dir
    for refused in (
        str(outside),
        str(allowed / "link.jsonl"),
        str(allowed / ".." / "elsewhere.jsonl"),
        "../elsewhere.jsonl",
        "/etc/passwd",
    ):
        with pytest.raises(BadInput, match="nor a file inside"):
            access.check_task(refused)
    for missing in (str(allowed / "none.jsonl"), str(allowed / "dir"), str(allowed)):
        with pytest.raises(BadInput, match="not a built-in task"):
            access.check_task(missing)
    with pytest.raises(BadInput, match="nor a file path"):
        access.check_task("a\0b")


@pytest.mark.parametrize("where", ["outside", "symlink", "no dirs allowed"])
def test_the_prompt_page_refuses_a_task_file_it_may_not_read(db, monkeypatch, tmp_path, where):
    allowed = tmp_path / "tasks"
    allowed.mkdir()
    outside = _id_task(tmp_path / "elsewhere.jsonl")
    task = str(outside)
    if where == "symlink":
        task = str(allowed / "link.jsonl")
        Path(task).symlink_to(outside)
    if where != "no dirs allowed":
        monkeypatch.setenv(access.TASK_DIRS_ENV, str(allowed))
    started = access.launcher().started
    at = _open(db, monkeypatch, {"view": "prompt"})
    at = _analyse(at, task=task)
    (error,) = _shown(at, "error")
    assert "not a built-in task" in error
    assert access.launcher().started == started  # no process
    assert "prompt_job" not in at.session_state
    assert _count(db, "prompt_views") == 0


def test_the_prompt_page_analyses_a_task_file_inside_an_allowed_dir(db, monkeypatch, tmp_path):
    allowed = tmp_path / "tasks"
    allowed.mkdir()
    _id_task(allowed / "mine.jsonl")
    monkeypatch.setenv(access.TASK_DIRS_ENV, str(allowed))
    at = _open(db, monkeypatch, {"view": "prompt"}, timeout=600)
    at = _ok(_analyse(at, task="mine.jsonl"))
    assert _count(db, "prompt_views") == 1
    assert at.session_state["prompt_pick"].startswith("p-")


# -- processes -------------------------------------------------------------------------------


def _waiter(flag: Path) -> list[str]:
    """A child that runs until `flag` exists."""
    code = "import os, sys, time\nwhile not os.path.exists(sys.argv[1]): time.sleep(0.05)"
    return [sys.executable, "-c", code, str(flag)]


def test_a_second_analysis_is_refused_while_the_bound_is_reached(db, monkeypatch, tmp_path):
    monkeypatch.setenv(access.MAX_PROCESSES_ENV, "1")
    flag = tmp_path / "flag"
    job = access.launcher().start(_waiter(flag), limit=1, timeout=BOUND, what="A waiter")
    assert job is not None
    try:
        started = access.launcher().started
        at = _open(db, monkeypatch, {"view": "prompt"})
        at = _analyse(at, text="a b c")
        (warning,) = _shown(at, "warning")
        assert "did not start" in warning and access.MAX_PROCESSES_ENV in warning
        assert access.launcher().started == started
        assert access.launcher().start(["true"], limit=1, timeout=BOUND, what="x") is None
    finally:
        flag.touch()
        assert job.done.wait(BOUND)
    assert job.proc.returncode == 0 and job not in access.launcher().live()
    assert _count(db, "prompt_views") == 0


def test_a_child_past_its_timeout_is_stopped(tmp_path):
    job = access.launcher().start(_waiter(tmp_path / "never"), limit=10, timeout=1, what="A waiter")
    assert job is not None
    assert job.done.wait(BOUND)
    assert job.timed_out and _gone(job.pid) and job not in access.launcher().live()
    assert "stopped after 1 s" in (job.failure() or "")


def test_the_prompt_page_says_when_its_analysis_was_stopped(db, monkeypatch):
    monkeypatch.setenv(access.PROCESS_TIMEOUT_ENV, "1")  # (loading the model alone takes longer)
    at = _open(db, monkeypatch, {"view": "prompt"})
    at = _analyse(at, text="a b c d")
    (error,) = _shown(at, "error")
    assert "stopped after 1 s" in error and access.PROCESS_TIMEOUT_ENV in error
    assert "prompt_job" not in at.session_state
    assert not access.launcher().live()
    assert _count(db, "prompt_views") == 0


def test_a_child_writing_a_megabyte_to_stderr_ends(tmp_path):
    code = "import sys\nsys.stderr.write('x' * 1_000_000 + '\\nlast line\\n')\nsys.exit(3)"
    job = access.launcher().start(
        [sys.executable, "-c", code], limit=10, timeout=BOUND, what="A writer"
    )
    assert job is not None
    assert job.done.wait(BOUND) and not job.timed_out
    assert job.proc.returncode == 3
    assert job.stderr_bytes() == 1_000_000 + len("\nlast line\n")
    assert len(job.stderr()) <= access.OUTPUT_KEPT
    assert job.failure() == "last line"


def test_a_prompt_too_long_to_pass_is_one_sentence(db, monkeypatch):
    at = _open(db, monkeypatch, {"view": "prompt"})
    at = _analyse(at, text="a" * 300_000)  # more than one argument may hold (128 KiB)
    (error,) = _shown(at, "error")
    assert error.startswith("The prompt analysis could not start")
    assert _count(db, "prompt_views") == 0


# -- text people typed -----------------------------------------------------------------------

_CODE_SPAN = re.compile(r"(`+)(.*?)(?<!`)\1(?!`)", re.S)
_MADE_LINK = re.compile(r"(?<!\\)\[[^\]]*(?<!\\)\]\(|https?://|www\.")


def markdown_links(at: AppTest) -> list[str]:
    """The page's Markdown elements that would make a link or an image (outside code spans)."""
    kinds = ("markdown", "caption", "error", "warning", "info", "success", "subheader")
    texts = [t for kind in kinds for t in _texts(at, kind)]
    return [t for t in texts if _MADE_LINK.search(_CODE_SPAN.sub("", t))]


def test_labels_and_notes_show_as_typed_not_as_markdown(db, monkeypatch):
    at = _open(db, monkeypatch, {"view": "circuit", "method": "eap", "k": "20"})
    heads = [n for n in at.multiselect(key="curate_pins").options if n.startswith("a")][:2]
    at = _ok(at.multiselect(key="curate_pins").set_value(heads).run())
    at = _ok(at.text_input(key="curate_group_label").set_value(NASTY_LABEL).run())
    at = _ok(at.multiselect(key="curate_group_members").set_value(heads[:1]).run())
    at = _ok(at.button(key="curate_group").click().run())
    at = _ok(at.selectbox(key="curate_note_target").set_value(heads[1]).run())
    at = _ok(at.text_input(key="curate_note_text").set_value(NASTY_NOTE).run())
    at = _ok(at.button(key="curate_note_add").click().run())
    shown = " ".join(_texts(at, "markdown"))
    assert NASTY_NOTE in shown and NASTY_LABEL in shown
    assert not markdown_links(at)
    # a name the store refuses comes back in its sentence: plain text too
    at = _ok(at.text_input(key="curate_name").set_value("[n](http://x.example/n)").run())
    at = at.multiselect(key="curate_pins").set_value([]).run()
    at = at.button(key="curate_save").click().run()
    assert any("no nodes" in e for e in _shown(at, "error"))
    assert not markdown_links(at)


def test_plain_and_literal_keep_markdown_out():
    for text in (NASTY_NOTE, NASTY_LABEL, "a@b.example www.x.example :orange[red] $x$ <b>"):
        assert not _MADE_LINK.search(access.plain(text))
        assert _CODE_SPAN.fullmatch(access.literal(text))
    assert access.plain("- 1. # x") == "\\- 1. \\# x"
    assert access.literal("a `b` c") == "``a `b` c``"
    assert access.plain("subgraph name: empty") == "subgraph name: empty"


@pytest.mark.browser
@pytest.mark.skipif(
    not (os.path.exists("/usr/bin/chromium") and os.path.exists("/usr/bin/chromedriver")),
    reason="Debian chromium and chromium-driver are not installed (make browser)",
)
def test_no_link_or_image_reaches_the_browser(db, monkeypatch):
    """A saved subgraph whose name, group label and notes are Markdown, opened from a link
    whose parameter is Markdown too: the browser shows the text, and no link or image."""
    from selenium.webdriver.common.by import By

    from tests.app.test_browser import _wait_for_text, chromium_driver, streamlit_server
    from workbench.store import Store
    from workbench.subgraphs import Subgraph, SubgraphEdge, SubgraphNode

    con = duckdb.connect(str(db), read_only=True)
    try:
        row = con.execute("SELECT model_id, checkpoint_id FROM checkpoints LIMIT 1").fetchone()
    finally:
        con.close()
    assert row is not None
    subgraph = Subgraph(
        name="[n](http://x.example/n)",
        model_id=row[0],
        checkpoint_id=row[1],
        source="run:[s](http://x.example/s)",
        nodes=[SubgraphNode("a0.h0", NASTY_LABEL), SubgraphNode("a1.h0", None, NASTY_NOTE)],
        edges=[SubgraphEdge("a0.h0", "a1.h0", 0.5, NASTY_NOTE)],
    )
    with Store(db) as store:
        sid = store.save_subgraph(subgraph)
    query = f"view=circuit&subgraph={sid}&collapse=%5Bk%5D(http://x.example/k)"
    with streamlit_server(db) as url, chromium_driver() as driver:
        driver.get(f"{url}/?{query}")
        _wait_for_text(driver, "note on", timeout=BOUND)
        _wait_for_text(driver, "link parameter", timeout=BOUND)
        body = driver.find_element(By.TAG_NAME, "body").text
        assert NASTY_NOTE in body and NASTY_LABEL in body and "[k](http://x.example/k)" in body
        assert not driver.find_elements(By.CSS_SELECTOR, "a[href*='x.example']")
        assert not driver.find_elements(By.CSS_SELECTOR, "img[src*='x.example']")


def test_a_never_ending_child_is_stopped_at_exit(tmp_path):
    """The server going away stops what it started (`atexit`)."""
    launcher = access.Launcher()
    job = launcher.start(_waiter(tmp_path / "never"), limit=1, timeout=BOUND, what="A waiter")
    assert job is not None
    launcher.stop_all()
    assert job.done.wait(BOUND) and _gone(job.pid)
