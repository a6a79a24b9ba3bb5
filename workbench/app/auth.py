"""Who may see the app: this machine only, unless a token or an identity provider guards it.

Streamlit serves the app on `server.address`. On a loopback address (127.0.0.0/8, ::1,
localhost) only this machine reaches it, and the app opens as it is. On any other address (and
when the address is unset, which makes Streamlit listen on every interface) the server is
reachable by others, so before anything renders - not the sidebar, not the database path -
each browser session must pass what is configured:

* the access token in the server's environment variable WORKBENCH_APP_TOKEN, given once per
  session either as a `?token=` parameter on the URL first opened (taken out of the URL at once,
  so links the app publishes never carry it) or in a login form;
* when Streamlit's own login is configured (an `[auth]` section in secrets.toml), a login with
  that identity provider (`st.login`).

Served beyond loopback with neither configured, the app shows one sentence on how to serve it
safely and stops. A token that is set is asked for on loopback too (other accounts on a shared
machine reach loopback), and so is a configured identity provider.

Streamlit's AppTest runs the script with no server at all: there an unset address counts as
loopback (Streamlit sets its `global.appTest` option while it runs a test script).
"""

import hmac
import os

import streamlit as st
from streamlit import config

from workbench.net import is_loopback

TOKEN_ENV = "WORKBENCH_APP_TOKEN"
PARAM = "token"
PASSED = "_auth_token_passed"  # session state: this session gave the right token


def served_beyond_loopback(address: str | None, *, app_test: bool = False) -> bool:
    """Whether a server bound to `address` is reachable from other machines (an unset address
    binds every interface; under AppTest there is no server to reach)."""
    if not address:
        return not app_test
    return not is_loopback(address)


def gate() -> None:
    """Stop this run unless the session may see the app (see the module docstring)."""
    address = config.get_option("server.address")
    beyond = served_beyond_loopback(address, app_test=bool(config.get_option("global.appTest")))
    token = os.environ.get(TOKEN_ENV, "")
    offered = _take_url_token()
    provider = _identity_provider_configured()
    if beyond and not token and not provider:
        st.error(_unsafe_sentence(address))
        st.stop()
    if provider and not st.user.get("is_logged_in"):
        _provider_login()
    if token and not st.session_state.get(PASSED):
        _token_login(token, offered)


def _unsafe_sentence(address: str | None) -> str:
    where = f"on {address}" if address else "on every interface"
    return (
        f"This app is served {where} with no access token, so it shows nothing: set "
        f"{TOKEN_ENV} in the server's environment (or start it with `workbench app --address "
        "HOST`, which makes one), or serve it on 127.0.0.1 only."
    )


def _take_url_token() -> str | None:
    """The URL's `token` parameter, which leaves the URL at once (None when it has none)."""
    if PARAM not in st.query_params:
        return None
    offered = st.query_params.get(PARAM)
    del st.query_params[PARAM]
    return offered


def _identity_provider_configured() -> bool:
    secrets = st.secrets
    return secrets.load_if_toml_exists() and "auth" in secrets


def _provider_login() -> None:
    st.info("Log in to open the Circuit Workbench.")
    st.button("Log in", on_click=st.login)
    st.stop()


def _token_login(token: str, offered: str | None) -> None:
    """Pass the session when the URL's or the form's token is right; else show the form and
    stop the run."""
    if offered is not None and _same(offered, token):
        st.session_state[PASSED] = True
        return
    with st.form("auth_login", clear_on_submit=True):
        typed = st.text_input("Access token", type="password")
        submitted = st.form_submit_button("Open")
    if submitted and _same(typed, token):
        st.session_state[PASSED] = True
        st.rerun()
    if submitted or offered is not None:
        st.error("That token is not right.")
    st.stop()


def _same(offered: str, token: str) -> bool:
    return hmac.compare_digest(offered.encode(), token.encode())
