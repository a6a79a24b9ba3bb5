"""Deep links: every page keeps its state in the URL's query parameters.

A page's widgets are made through the functions here. Each one is bound to a URL parameter:
when a browser session opens a URL, its parameters set the widgets they name (once, the first
time the widget is drawn); every run writes the page's current values back to the URL, so the
address bar always holds a link that reopens the page exactly as it is, e.g.
`?view=circuit&run=<run_id>&k=2000&node=a1.h0` or `?view=features&sae=<id>&feature=12`.

A value a page cannot take (a step that is not stored, `k=abc`, `min=nan`, `share=inf`) is
dropped with a note on the page naming the parameter; the widget keeps its default. A note quotes
the value as it came, in a code span (`app.access.literal`), so a link cannot put Markdown (a
link, an image) on the page.
"""

import math
from collections.abc import Callable, Sequence
from typing import Any

import streamlit as st

from workbench.app.access import literal

PENDING = "_links_pending"  # parameters of the opened URL not yet applied to a widget
SHOWN = "_links_shown"  # the parameters this run's widgets published
NOTES = "_links_notes"
_MISSING = object()


def restore(views: Sequence[str]) -> None:
    """Once per browser session: take the URL's parameters; `view` picks the page."""
    if st.session_state.get("_links_restored"):
        return
    st.session_state["_links_restored"] = True
    params = {name: st.query_params.get(name) for name in st.query_params}
    view = params.pop("view", None)
    if view is not None:
        match = {v.lower(): v for v in views}.get(str(view).lower())
        if match is None:
            _note(f"link parameter {_quoted('view', view)} is not a page of this app; ignored")
        else:
            st.session_state["view"] = match
    st.session_state[PENDING] = {k: str(v) for k, v in params.items() if v is not None}


def begin(view: str) -> None:
    """At the start of every run: forget the last run's values; a new page drops what is left
    of the opened link."""
    st.session_state[SHOWN] = {}
    if st.session_state.get("_links_view", view) != view:
        st.session_state[PENDING] = {}
    st.session_state["_links_view"] = view


def publish(view: str) -> None:
    """At the end of every run: the URL becomes this page and this run's widget values."""
    wanted = {"view": view.lower(), **st.session_state.get(SHOWN, {})}
    if {k: st.query_params.get(k) for k in st.query_params} != wanted:
        st.query_params.from_dict(wanted)


def notes() -> list[str]:
    """What the opened link carried that the page could not take (each said once)."""
    return list(st.session_state.pop(NOTES, []))


def take(param: str) -> str | None:
    """The opened link's value of `param`, once (None when it had none)."""
    return st.session_state.get(PENDING, {}).pop(param, None)


def has(param: str) -> bool:
    """Whether the opened link's `param` is still waiting for its widget."""
    return param in st.session_state.get(PENDING, {})


def prefill(**values: Any) -> None:
    """Set parameters as if the opened link had carried them (e.g. a run id naming its
    method, task and step)."""
    st.session_state.setdefault(PENDING, {}).update({k: _text(v) for k, v in values.items()})


def show(param: str, value: Any) -> None:
    """Publish a value that is not a widget's (e.g. the run id a choice of widgets names)."""
    if value is None or value == [] or value == "":
        st.session_state.setdefault(SHOWN, {}).pop(param, None)
    else:
        st.session_state.setdefault(SHOWN, {})[param] = _text(value)


def _text(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ",".join(_text(v) for v in value)
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def _note(text: str) -> None:
    st.session_state.setdefault(NOTES, []).append(text)


def _quoted(param: str, raw: Any) -> str:
    """`param='value'` for a note, as a code span (whatever the link carried)."""
    return literal(f"{param}={raw!r}")


def _choose(param: str, key: str, options: list, *, many: bool = False) -> None:
    """Apply a pending link value to a choice widget's state; drop a stale state."""
    raw = take(param)
    if raw is not None:
        by_text = {_text(o): o for o in options}
        wanted = ([] if raw == "-" else raw.split(",")) if many else [raw]
        found = [by_text[w] for w in wanted if w in by_text]
        if len(found) != len(wanted):
            _note(f"link parameter {_quoted(param, raw)} is not among this page's choices; ignored")
        else:
            st.session_state[key] = found if many else found[0]
    current = st.session_state.get(key, _MISSING)
    if current is _MISSING:
        return
    if many:
        if not all(c in options for c in current):
            st.session_state[key] = [c for c in current if c in options]
    elif current not in options:
        del st.session_state[key]


def selectbox(
    label: str,
    options: Sequence[Any],
    *,
    key: str,
    param: str,
    index: int = 0,
    format_func: Callable[[Any], str] = str,
    where: Any = None,
) -> Any:
    options = list(options)
    _choose(param, key, options)
    if key not in st.session_state and options:
        st.session_state[key] = options[index]
    value = (where or st).selectbox(label, options, key=key, format_func=format_func)
    show(param, value)
    return value


def radio(
    label: str, options: Sequence[Any], *, key: str, param: str, where: Any = None, **kw: Any
) -> Any:
    options = list(options)
    _choose(param, key, options)
    value = (where or st).radio(label, options, key=key, **kw)
    show(param, value)
    return value


def select_slider(
    label: str,
    options: Sequence[Any],
    *,
    key: str,
    param: str,
    value: Any = None,
    where: Any = None,
) -> Any:
    """One of `options` on a slider (`value`: the default)."""
    options = list(options)
    _choose(param, key, options)
    if key not in st.session_state:
        st.session_state[key] = value
    chosen = (where or st).select_slider(label, options=options, key=key)
    show(param, chosen)
    return chosen


def number(
    label: str,
    lo: float,
    hi: float,
    default: float,
    *,
    key: str,
    param: str,
    slider: bool = True,
    where: Any = None,
    **kw: Any,
) -> Any:
    """An int or float slider (or number input) in [lo, hi]; a linked value out of range is
    clamped into it, one that is not a finite number (`abc`, `nan`, `inf`) dropped."""
    kind = float if isinstance(lo, float) or isinstance(default, float) else int
    raw = take(param)
    if raw is not None:
        try:
            linked = kind(raw)
        except ValueError:
            _note(f"link parameter {_quoted(param, raw)} is not a number; ignored")
        else:
            if math.isfinite(linked):
                st.session_state[key] = min(max(linked, kind(lo)), kind(hi))
            else:
                _note(f"link parameter {_quoted(param, raw)} is not a finite number; ignored")
    current = st.session_state.get(key, _MISSING)
    if current is not _MISSING and not (lo <= current <= hi):
        st.session_state[key] = min(max(current, lo), hi)
    if key not in st.session_state:
        st.session_state[key] = kind(default)
    widget = (where or st).slider if slider else (where or st).number_input
    value = widget(label, min_value=kind(lo), max_value=kind(hi), key=key, **kw)
    show(param, value)
    return value


def text(label: str, *, key: str, param: str, area: bool = False, where: Any = None, **kw: Any):
    raw = take(param)
    if raw is not None:
        st.session_state[key] = raw
    widget = (where or st).text_area if area else (where or st).text_input
    value = widget(label, key=key, **kw)
    show(param, value)
    return value


def multiselect(
    label: str,
    options: Sequence[Any],
    *,
    key: str,
    param: str,
    default: Sequence[Any] = (),
    where: Any = None,
) -> list:
    options = list(options)
    _choose(param, key, options, many=True)
    if key not in st.session_state:
        st.session_state[key] = [d for d in default if d in options]
    value = (where or st).multiselect(label, options, key=key)
    show(param, value if value else "-")
    return value


def checkbox(label: str, *, key: str, param: str, default: bool = False, where: Any = None):
    raw = take(param)
    if raw is not None:
        if raw in ("0", "1"):
            st.session_state[key] = raw == "1"
        else:
            _note(f"link parameter {_quoted(param, raw)} is not 0 or 1; ignored")
    if key not in st.session_state:
        st.session_state[key] = default
    value = (where or st).checkbox(label, key=key)
    show(param, value)
    return value
