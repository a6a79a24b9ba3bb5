"""The Prompt page's "Why this token" and "Patchscope" tabs: the input attribution of the
prediction by every stored method (one row of coloured tokens per method), each method's
deletion and insertion curves with their areas, the rank agreement between methods, the
methods' scores over each layer's positions, and Patchscope's decoded hidden states."""

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from workbench.app import access, queries
from workbench.app.views.common import diverging_heatmap

KIND_DASH = {"deletion": "solid", "insertion": "dot"}


def render_why(pid: str, tokens: list[str]) -> None:
    stored = queries.prompt_explanations(pid)
    if stored.empty:
        st.info(
            "No input attribution stored for this prompt: run "
            "`workbench run prompt --model ... --text ... --target TOKEN`."
        )
        return
    labels = stored["label"].tolist()
    label = st.selectbox("Explanation", labels, key="why_pick")
    row = stored[stored["label"] == label].iloc[0]
    eid = str(row["explanation_id"])
    st.caption(
        f"what each input token contributes to the logit of {access.literal(row['target'])} "
        f"at the last position ({row['target_logit']:.3g}; probability "
        f"{row['target_prob']:.3g}; {row['baseline_logit']:.3g} with every token replaced by "
        "the baseline) · each row scaled by its largest |score|"
    )
    scores = queries.explanation_scores(eid)
    grid = scores.pivot_table(index="method", columns="position", values="score")
    bound = grid.abs().max(axis=1).replace(0, 1.0)
    scaled = grid.div(bound, axis=0)
    text = np.array([[tokens[p] for p in grid.columns] for _ in grid.index])
    fig = diverging_heatmap(
        scaled.values,
        1.0,
        {"x": "input token", "y": "", "color": "score / max |score|"},
        x=[f"{p}:{tokens[p]}" for p in grid.columns],
        y=list(grid.index),
    )
    fig.update_traces(
        text=text,
        texttemplate="%{text}",
        customdata=grid.values,
        hovertemplate="%{y} · %{x}<br>score %{customdata:.4g}<extra></extra>",
    )
    fig.update_layout(height=120 + 40 * len(grid.index))
    st.plotly_chart(fig, key="why_tokens")
    _curves(eid)
    _agreement(eid, int(row["top_k"]))
    _layers(eid, tokens)


def _curves(eid: str) -> None:
    curves = queries.explanation_curves(eid)
    methods = queries.explanation_methods(eid)
    c1, c2 = st.columns([3, 2])
    fig = go.Figure()
    for (method, kind), part in curves.groupby(["method", "kind"], sort=True):
        n = max(int(part["k"].max()), 1)
        fig.add_trace(
            go.Scatter(
                x=part["k"] / n,
                y=part["prob"],
                mode="lines",
                name=f"{method} · {kind}",
                line={"dash": KIND_DASH[str(kind)]},
                legendgroup=str(method),
            )
        )
    fig.update_layout(
        xaxis={"title": "share of tokens deleted (solid) or inserted (dotted)"},
        yaxis={"title": "probability of the target"},
        height=420,
    )
    c1.caption(
        "faithfulness: tokens removed (deletion) or put back (insertion) in each method's "
        "order, the others at the baseline; a faithful order falls fast and rises fast"
    )
    c1.plotly_chart(fig, key="why_curves")
    c2.caption(
        "areas under the curves, of the probability and of the logit as a share of its change "
        "from the baseline (deletion: lower is better; insertion: higher)"
    )
    c2.dataframe(methods, hide_index=True, key="why_methods")


def _agreement(eid: str, top_k: int) -> None:
    pairs = queries.explanation_agreement(eid)
    if pairs.empty:
        return
    names = sorted(set(pairs["method_a"]) | set(pairs["method_b"]))
    grid = pd.DataFrame(np.eye(len(names)), index=names, columns=names)
    shares = grid.copy()
    for r in pairs.itertuples():
        grid.loc[r.method_a, r.method_b] = grid.loc[r.method_b, r.method_a] = r.spearman
        shares.loc[r.method_a, r.method_b] = shares.loc[r.method_b, r.method_a] = r.top_k_share
    c1, c2 = st.columns(2)
    c1.caption("Spearman's rank correlation of the token scores, per pair of methods")
    fig = diverging_heatmap(grid.values.astype(float), 1.0, {"color": "spearman"},
                            x=names, y=names)  # fmt: skip
    fig.update_traces(texttemplate="%{z:.2f}")
    c1.plotly_chart(fig, key="why_agreement")
    c2.caption(f"share of the top {top_k} tokens by |score| the two methods have in common")
    fig = px.imshow(shares.values.astype(float), x=names, y=names, zmin=0, zmax=1,
                    color_continuous_scale="Greens", aspect="auto")  # fmt: skip
    fig.update_traces(texttemplate="%{z:.2f}")
    c2.plotly_chart(fig, key="why_topk")


def _layers(eid: str, tokens: list[str]) -> None:
    layers = queries.explanation_layers(eid)
    if layers.empty:
        return
    methods = sorted(set(layers["method"]))
    method = st.selectbox("Over each layer's positions", methods, key="why_layer_method")
    part = layers[layers["method"] == method]
    grid = part.pivot_table(index="layer", columns="position", values="score")
    bound = float(np.nanmax(np.abs(grid.values))) if grid.size else 1.0
    fig = diverging_heatmap(
        grid.values,
        bound,
        {"x": "position", "y": "residual stream before layer", "color": method},
        x=[f"{p}:{tokens[p]}" for p in grid.columns],
        y=[str(i) for i in grid.index],
    )
    st.caption(
        f"{method} over the residual stream before each layer (0: the embeddings; the last: "
        "the final residual stream)"
    )
    st.plotly_chart(fig, key="why_layers")


def render_patchscope(pid: str, tokens: list[str]) -> None:
    scope = queries.prompt_patchscope(pid)
    if scope.empty:
        st.info("No Patchscope stored for this prompt: run `workbench run prompt` with it on.")
        return
    first = scope.iloc[0]
    position = int(first["source_position"])
    st.caption(
        f"the hidden state of {access.literal(tokens[position])} (position {position}) at each "
        "residual stream, patched into the inspection prompt's last token "
        f"{access.literal(str(first['template']))}; the greedy continuation of "
        f"{access.literal(str(first['inspector_id']))}"
    )
    shown = scope[["source_layer", "target_layer", "text"]].rename(
        columns={"source_layer": "stream (before layer)", "target_layer": "patched into"}
    )
    st.dataframe(shown, hide_index=True, key="why_patchscope")
