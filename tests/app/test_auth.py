"""Who may see the app (app/auth.py), driven with Streamlit's AppTest: served beyond loopback
(Streamlit's real `server.address` option set as a server started with `--server.address` has
it), nothing renders - not the sidebar, not the database path - before the session gives the
token or logs in; served beyond loopback with neither configured, one sentence and nothing else."""

from collections.abc import Iterator
from pathlib import Path

import pytest
from streamlit import config
from streamlit.testing.v1 import AppTest

from workbench.app.auth import is_loopback, served_beyond_loopback

APP = str(Path(__file__).resolve().parents[2] / "app" / "main.py")
TOKEN = "a-long-enough-token-for-tests"
AUTH = {"redirect_uri": "http://example.invalid/oauth2callback", "cookie_secret": "s3cret"}


@pytest.fixture()
def served_on() -> Iterator:
    """Set Streamlit's `server.address` for the test, as `--server.address` does."""
    before = config.get_option("server.address")
    yield lambda address: config.set_option("server.address", address)
    config.set_option("server.address", before)


def _open(db: Path, monkeypatch, *, params: dict | None = None, **kw) -> AppTest:
    monkeypatch.setenv("WORKBENCH_DB", str(db))
    from workbench.app import data

    data.query.clear()
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params.update(params or {})
    for name, value in kw.items():
        setattr(at, name, value)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _leaves(node) -> list:
    children = getattr(node, "children", None)
    if isinstance(children, dict):
        return [leaf for child in children.values() for leaf in _leaves(child)]
    return [node]


def _rendered(at: AppTest) -> list[tuple[str, str]]:
    """Every element drawn anywhere (main area and sidebar): (kind, its whole message)."""
    return [(type(e).__name__, str(getattr(e, "proto", e))) for e in _leaves(at._tree)]


def _kinds(at: AppTest) -> list[str]:
    return [kind for kind, _ in _rendered(at)]


def _nothing_of_the_app(at: AppTest, db: Path) -> None:
    assert not at.sidebar.children
    assert not any(str(db) in text or text == "Circuit Workbench" for _, text in _rendered(at))
    assert not at.metric and not at.dataframe and not at.title


def _shows_the_overview(at: AppTest, db: Path) -> None:
    assert not at.error, [e.value for e in at.error]
    assert at.sidebar.radio(key="view").value == "Overview"
    assert {m.label for m in at.metric} >= {"checkpoints", "runs done"}
    assert any(str(db) in c.value for c in at.sidebar.caption)


def test_loopback_addresses():
    for local in ("127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost", "::ffff:127.0.0.1"):
        assert is_loopback(local) and not served_beyond_loopback(local), local
    for open_ in ("0.0.0.0", "::", "10.1.2.3", "192.168.0.4", "fe80::1", "example.org"):
        assert not is_loopback(open_) and served_beyond_loopback(open_), open_
    assert served_beyond_loopback(None) and served_beyond_loopback("")  # every interface
    assert not served_beyond_loopback(None, app_test=True)  # AppTest: no server at all
    assert served_beyond_loopback("0.0.0.0", app_test=True)


def test_served_beyond_loopback_without_a_token_is_one_sentence(heads_db, monkeypatch, served_on):
    monkeypatch.delenv("WORKBENCH_APP_TOKEN", raising=False)
    served_on("0.0.0.0")
    at = _open(heads_db, monkeypatch)
    assert _kinds(at) == ["Error"]
    sentence = at.error[0].value
    assert "served on 0.0.0.0 with no access token" in sentence
    assert "WORKBENCH_APP_TOKEN" in sentence and sentence.count(". ") == 0
    _nothing_of_the_app(at, heads_db)


def test_a_session_without_the_token_sees_only_the_login_form(heads_db, monkeypatch, served_on):
    monkeypatch.setenv("WORKBENCH_APP_TOKEN", TOKEN)
    served_on("0.0.0.0")
    at = _open(heads_db, monkeypatch, params={"view": "sql"})
    assert sorted(_kinds(at)) == ["Button", "TextInput"]  # the form: token field, Open
    _nothing_of_the_app(at, heads_db)


def test_the_token_in_the_url_opens_the_app_and_leaves_the_url(heads_db, monkeypatch, served_on):
    monkeypatch.setenv("WORKBENCH_APP_TOKEN", TOKEN)
    served_on("0.0.0.0")
    at = _open(heads_db, monkeypatch, params={"token": TOKEN, "view": "overview"})
    _shows_the_overview(at, heads_db)
    assert dict(at.query_params) == {"view": "overview"}  # the published link: no token
    at.sidebar.radio(key="view").set_value("Heads").run()  # the session stays let in
    assert not at.exception and at.selectbox(key="heads_method").value
    assert "token" not in at.query_params


def test_a_wrong_token_renders_nothing_of_the_app(heads_db, monkeypatch, served_on):
    monkeypatch.setenv("WORKBENCH_APP_TOKEN", TOKEN)
    served_on("10.0.0.1")
    at = _open(heads_db, monkeypatch, params={"token": TOKEN + "x"})
    assert sorted(_kinds(at)) == ["Button", "Error", "TextInput"]
    assert at.error[0].value == "That token is not right."
    assert "token" not in at.query_params
    _nothing_of_the_app(at, heads_db)

    at.text_input[0].input("guess")
    at.button[0].click().run()
    assert at.error[0].value == "That token is not right."
    _nothing_of_the_app(at, heads_db)

    at.text_input[0].input(TOKEN)
    at.button[0].click().run()
    _shows_the_overview(at, heads_db)


def test_a_token_set_is_asked_for_on_loopback_too(heads_db, monkeypatch, served_on):
    monkeypatch.setenv("WORKBENCH_APP_TOKEN", TOKEN)
    served_on("127.0.0.1")
    _nothing_of_the_app(_open(heads_db, monkeypatch), heads_db)


def test_loopback_and_apptest_need_nothing(heads_db, monkeypatch, served_on):
    monkeypatch.delenv("WORKBENCH_APP_TOKEN", raising=False)
    for address in ("127.0.0.1", "localhost", None):  # None: AppTest serves nobody
        served_on(address)
        _shows_the_overview(_open(heads_db, monkeypatch), heads_db)


def test_an_identity_provider_logged_out_sees_only_the_login(heads_db, monkeypatch, served_on):
    monkeypatch.delenv("WORKBENCH_APP_TOKEN", raising=False)
    served_on("0.0.0.0")
    at = _open(heads_db, monkeypatch, secrets={"auth": AUTH})
    assert _kinds(at) == ["Info", "Button"]
    assert at.info[0].value == "Log in to open the Circuit Workbench."
    assert at.button[0].proto.label == "Log in"
    _nothing_of_the_app(at, heads_db)

    user = {"is_logged_in": True, "email": "someone@example.invalid"}
    _shows_the_overview(_open(heads_db, monkeypatch, secrets={"auth": AUTH}, user=user), heads_db)


def test_read_only_servers_say_so_in_the_sidebar(heads_db, monkeypatch):
    monkeypatch.delenv("WORKBENCH_APP_TOKEN", raising=False)
    monkeypatch.setenv("WORKBENCH_APP_READ_ONLY", "1")
    at = _open(heads_db, monkeypatch)
    assert any(c.value.startswith("Read-only:") for c in at.sidebar.caption)
    monkeypatch.setenv("WORKBENCH_APP_READ_ONLY", "0")
    at = _open(heads_db, monkeypatch)
    assert not any(c.value.startswith("Read-only:") for c in at.sidebar.caption)
    assert not at.sidebar.warning
    monkeypatch.setenv("WORKBENCH_APP_READ_ONLY", "maybe")  # unreadable: read-only, and said
    at = _open(heads_db, monkeypatch)
    assert any(c.value.startswith("Read-only:") for c in at.sidebar.caption)
    assert len(at.sidebar.warning) == 1 and "WORKBENCH" in at.sidebar.warning[0].value
