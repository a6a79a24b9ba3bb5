"""Features: pick an SAE (its quality metrics), search its features by index or by the tokens
they promote, and a feature dashboard: statistics, activation histogram, top examples with the
activating token highlighted, logit effects, its attribution in every `sae_attr` run and the
heads that write into it."""

import html
import json

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from workbench.app import access, links, queries
from workbench.app.views.common import pick_row, select_model
from workbench.core import Node

WINDOW = 10  # tokens shown either side of the activating one


def open_feature(sae_id: str, feature: int) -> None:
    """Switch to this page showing one feature (a button callback, run before the rerun)."""
    st.session_state["view"] = "Features"
    st.session_state["features_sae"] = sae_id
    st.session_state["features_index"] = feature


def render() -> None:
    st.header("SAE features")
    model_id = select_model("features_model")
    if model_id is None:
        return
    saes = queries.saes_of(model_id)
    if saes.empty:
        st.info("No SAEs for this model yet: `workbench run sae --model ... --hook ...`.")
        return
    sae = pick_row(saes, "sae_id", "SAE", key="features_sae", param="sae")
    sae_id = str(sae["sae_id"])
    _quality(sae)
    _search(sae_id, int(sae["d_sae"]))
    feature = int(
        links.number(
            "Feature",
            0,
            int(sae["d_sae"]) - 1,
            0,
            key="features_index",
            param="feature",
            slider=False,
            step=1,
        )
    )
    _dashboard(sae, feature)


def _quality(sae: pd.Series) -> None:
    cols = st.columns(5)
    cols[0].metric("L0", f"{sae['l0']:.2f}")
    cols[1].metric("explained variance", f"{sae['explained_variance']:.3f}")
    ce = sae["ce_loss_recovered"]
    cols[2].metric("CE loss recovered", "n/a" if pd.isna(ce) else f"{ce:.3f}")
    cols[3].metric("dead features", f"{100 * sae['dead_fraction']:.1f}%")
    cols[4].metric("corpus tokens", f"{int(sae['n_tokens']):,}")
    st.caption(
        f"{access.literal(sae['path'] or sae['source'])} · corpus {access.literal(sae['corpus'])}"
    )


def _search(sae_id: str, d_sae: int) -> None:
    with st.expander("Search features", expanded=False):
        c1, c2 = st.columns([3, 1])
        text = links.text(
            "Token the feature promotes (substring)", key="features_search", param="q", where=c1
        )
        order = links.selectbox(
            "Order by", list(queries.FEATURE_ORDERS), key="features_order", param="order", where=c2
        )
        flags = links.multiselect(
            "Show",
            list(queries.FEATURE_FLAGS),
            default=["alive"],
            key="features_flags",
            param="show",
        )
        found = queries.features_of(sae_id, text=text, flags=flags, order=order)
        st.caption(f"{len(found)} of {d_sae} features")
        st.dataframe(found, hide_index=True, key="features_table")


def _dashboard(sae: pd.Series, feature: int) -> None:
    sae_id = str(sae["sae_id"])
    row = queries.feature_stats(sae_id, feature)
    if row.empty:
        st.warning(f"feature {feature} of {access.literal(sae_id)} has no statistics")
        return
    f = row.iloc[0]
    st.subheader(f"Feature {feature}  ·  {access.literal(Node.sae_feature(sae_id, feature).id)}")
    cols = st.columns(4)
    cols[0].metric("density", f"{f['density']:.4f}")
    cols[1].metric("max activation", f"{f['max_activation']:.3f}")
    cols[2].metric("mean when active", f"{f['mean_activation']:.3f}")
    cols[3].metric("flag", "dead" if f["dead"] else ("dense" if f["dense"] else "—"))
    left, right = st.columns([3, 2])
    with left:
        _histogram(f["histogram"], sae["histogram_edges"])
        _examples(sae_id, feature)
    with right:
        _logits(f)
        _attribution(sae_id, feature)


def card(sae_id: str, feature: int) -> None:
    """A feature's dashboard in short, for another page: its statistics, top activating
    contexts and logit effects."""
    row = queries.feature_stats(sae_id, feature)
    if row.empty:
        st.caption(f"feature {feature} of {access.literal(sae_id)} has no statistics")
        return
    f = row.iloc[0]
    cols = st.columns(3)
    cols[0].metric("density", f"{f['density']:.4f}")
    cols[1].metric("max activation", f"{f['max_activation']:.3f}")
    cols[2].metric("mean when active", f"{f['mean_activation']:.3f}")
    left, right = st.columns([3, 2])
    with left:
        _examples(sae_id, feature)
    with right:
        _logits(f)


def _histogram(counts: object, edges: object) -> None:
    counts_list = [int(c) for c in list(counts)]  # type: ignore[call-overload]
    edges_list = [float(e) for e in list(edges)]  # type: ignore[call-overload]
    if not any(counts_list):
        st.caption("never active on the corpus")
        return
    centres = [(a * b) ** 0.5 for a, b in zip(edges_list[:-1], edges_list[1:], strict=True)]
    widths = [b - a for a, b in zip(edges_list[:-1], edges_list[1:], strict=True)]
    fig = go.Figure(go.Bar(x=centres, y=counts_list, width=widths))
    fig.update_layout(
        xaxis={"type": "log", "title": "activation"},
        yaxis={"title": "tokens"},
        height=240,
        margin={"l": 40, "r": 10, "t": 10, "b": 40},
    )
    st.plotly_chart(fig, key="features_histogram")


def _examples(sae_id: str, feature: int) -> None:
    examples = queries.feature_examples(sae_id, feature)
    st.markdown("**Top activating contexts**")
    if examples.empty:
        st.caption("no examples")
        return
    lines = []
    for ex in examples.itertuples():
        tokens = list(ex.tokens)
        pos = int(ex.position)
        start = max(0, pos - WINDOW)
        shown = []
        for i in range(start, min(len(tokens), pos + WINDOW + 1)):
            token = html.escape(str(tokens[i]))
            if i == pos:
                token = f"<mark><b>{token}</b></mark>"
            shown.append(token)
        prefix = "… " if start > 0 else ""
        lines.append(f"<code>{ex.activation:7.3f}</code> {prefix}{' '.join(shown)}")
    st.markdown("<br>".join(lines), unsafe_allow_html=True)


def _logits(f: pd.Series) -> None:
    st.markdown("**Logit effects** (per unit of activation, through `W_dec W_U`)")
    if f["top_logits"] is None or pd.isna(f["top_logits"]):
        st.caption("this SAE's hook does not write to the residual stream")
        return
    top = pd.DataFrame(json.loads(f["top_logits"]))[["token", "value"]]
    bottom = pd.DataFrame(json.loads(f["bottom_logits"]))[["token", "value"]]
    c1, c2 = st.columns(2)
    c1.caption("promoted")
    c1.dataframe(top, hide_index=True, key="features_promoted")
    c2.caption("suppressed")
    c2.dataframe(bottom, hide_index=True, key="features_suppressed")


def _attribution(sae_id: str, feature: int) -> None:
    scores = queries.feature_attribution(sae_id, feature)
    st.markdown("**Attribution to the task metric** (`sae_attr`)")
    if scores.empty:
        st.caption("not scored by any sae_attr run")
    else:
        st.dataframe(scores, hide_index=True, key="features_scores")
    heads = queries.heads_writing_feature(sae_id, feature)
    if not heads.empty:
        st.caption("heads writing into this feature (direct write × gradient)")
        st.dataframe(heads, hide_index=True, key="features_heads")
