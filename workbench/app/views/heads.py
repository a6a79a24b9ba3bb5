"""Heads: a layer x head heatmap of any run's scores, with a checkpoint selector, and each
head's score across checkpoints (the formation of the induction head over training); and the
head catalogue (`workbench run catalogue`): what each head does with no task, its composition
with earlier heads, and a score's course over training."""

import json

import numpy as np
import pandas as pd
import plotly.express as px
import streamlit as st

from workbench.app import links, queries
from workbench.app.views.common import diverging_heatmap, pick_run, reliability, select_model

SCORE_HELP = {
    "previous_token": "attention from each position to the one before",
    "duplicate_token": "attention to earlier copies of the current token",
    "induction": "attention to the token after an earlier copy of the current token",
    "sink": "attention from every later position to the first token",
    "dormant_novel": "share of positions, before the repeat, resting on the first token (>= 0.9)",
    "dormant_repeated": "share of positions, in the repeat, resting on the first token (>= 0.9)",
    "retrieval": "share of a needle's tokens the head copy-pastes while the model continues it",
    "copying": "share of positive eigenvalues of the OV circuit (1 copies, -1 suppresses)",
}
RELATION_HELP = {
    "maps:": "share of the relation's pairs whose target is among the k tokens the head's OV "
    "circuit maps the source to most (MAPS)",
    "maps_suppression:": "share of the relation's pairs whose target is among the k tokens the "
    "head's OV circuit maps the source to least (MAPS)",
}


def _help(name: str) -> str:
    if name in SCORE_HELP:
        return SCORE_HELP[name]
    prefix = next(p for p in RELATION_HELP if name.startswith(p))
    return f"relation {name.removeprefix(prefix)!r}: {RELATION_HELP[prefix]}"


def render() -> None:
    st.header("Attention heads")
    model_id = select_model("heads_model")
    if model_id is None:
        return
    runs_tab, catalogue_tab = st.tabs(["Scores of runs", "Catalogue"])
    with runs_tab:
        _run_scores(model_id)
    with catalogue_tab:
        _catalogue(model_id)


def _heatmap(values: pd.DataFrame, bound: float, color: str) -> object:
    """A layer x head heatmap of `values` (columns layer, head and `color`)."""
    n_layers, n_heads = int(values["layer"].max()) + 1, int(values["head"].max()) + 1
    grid = np.full((n_layers, n_heads), np.nan)
    grid[values["layer"], values["head"]] = values[color]
    labels = {"x": "head", "y": "layer", "color": color}
    fig = diverging_heatmap(grid, bound, labels, text_auto=".2f" if n_heads <= 16 else False)
    fig.update_xaxes(dtick=1)
    fig.update_yaxes(dtick=1)
    return fig


def _run_scores(model_id: str) -> None:
    runs = queries.done_runs(model_id)
    runs = runs[runs["pipeline"] == "heads"]
    if runs.empty:
        st.info("No head attribution runs for this model yet.")
        return
    run = pick_run(runs, "heads", slider=True)
    scores = queries.head_scores(str(run["run_id"]))
    if scores.empty:
        st.info("This run stored no head scores.")
        return
    fig = _heatmap(scores, float(np.nanmax(np.abs(scores["score"]))), "score")
    st.caption(
        f"run `{run['run_id']}` · metric clean {run['metric_clean']:.3f}, "
        f"corrupt {run['metric_corrupt']:.3f}"
    )
    st.plotly_chart(fig, key="heads_heatmap")
    reliability(str(run["run_id"]), "heads")
    top = scores.reindex(scores["score"].abs().sort_values(ascending=False).index).head(10)
    if top["stderr"].notna().any():
        bars = px.bar(
            top, x="head_id", y="score", error_y="stderr",
            labels={"head_id": "head", "score": "score ± standard error over prompts"},
        )  # fmt: skip
        st.plotly_chart(bars, key="heads_error_bars")
    st.dataframe(top, hide_index=True, key="heads_top")

    agreement = queries.agreement_with(str(run["run_id"]), "node")
    if not agreement.empty:
        st.subheader("Agreement with the other runs here")
        st.caption(
            "Spearman's rank correlation of this run's node scores with each other run's at "
            "this checkpoint and task, over the nodes both scored: of the scores, and of their "
            "magnitudes (which nodes matter most, whatever the sign)"
        )
        st.dataframe(agreement.round(3), hide_index=True, key="heads_agreement")

    st.subheader("Across checkpoints")
    history = queries.head_score_history(model_id, str(run["method"]), str(run["task_id"]))
    st.plotly_chart(
        px.line(history, x="step", y="score", color="node_id", markers=True), key="heads_history"
    )


def _catalogue(model_id: str) -> None:
    stored = queries.catalogues(model_id)
    if stored.empty:
        st.info(
            "No head catalogue for this model yet: `workbench run catalogue --model MODEL "
            "--checkpoint all` computes one per checkpoint."
        )
        return
    steps = stored["step"].tolist()
    step = links.select_slider(
        "Checkpoint (training step)", steps, value=steps[-1], key="catalogue_step",
        param="catalogue_step",
    )  # fmt: skip
    chosen = stored[stored["step"] == step].iloc[0]
    links.show("catalogue", str(chosen["catalogue_id"]))
    params = json.loads(str(chosen["params"]))
    st.caption(
        f"catalogue `{chosen['catalogue_id']}` · {params['n_sequences']} sequences of "
        f"{params['length']} random tokens repeated once (seed {params['seed']}, "
        f"{params['dtype']}) · {float(chosen['seconds']):.1f} s"
    )
    scores = queries.catalogue_scores(str(chosen["catalogue_id"]))
    stored_names = set(scores["score"])
    relations = sorted(n for n in stored_names if n.startswith(tuple(RELATION_HELP)))
    names = [n for n in SCORE_HELP if n in stored_names] + relations
    name = links.selectbox("Score", names, key="catalogue_score", param="score")
    st.caption(_help(name))
    picked = scores[scores["score"] == name]
    st.plotly_chart(_heatmap(picked, 1.0, "value"), key="catalogue_heatmap")
    wide = (
        scores.pivot_table(index="node_id", columns="score", values="value", dropna=False)
        .reindex(columns=names)
        .reset_index()
    )
    wide = wide[["node_id", *names]].sort_values(name, ascending=False)
    st.dataframe(wide.head(10).round(3), hide_index=True, key="catalogue_top")

    st.subheader("Composition")
    mode = links.selectbox("Composition", ["K", "Q", "V"], key="catalogue_mode", param="mode")
    pairs = queries.catalogue_composition(str(chosen["catalogue_id"]), mode)
    if pairs.empty:
        st.info("One layer: no head has an earlier head to compose with.")
    else:
        port = {"Q": "query", "K": "key", "V": "value"}[mode]
        st.caption(
            f"{mode}-composition: how much of a later head's {port} circuit reads what an "
            "earlier head writes (0 to 1)"
        )
        st.dataframe(pairs.head(10).round(3), hide_index=True, key="catalogue_composition")

    _mappings(str(chosen["catalogue_id"]), wide["node_id"].tolist())

    st.subheader("Across checkpoints")
    top = wide["node_id"].head(5).tolist()
    history = queries.catalogue_history(model_id, name, top)
    st.plotly_chart(
        px.line(history, x="step", y="value", color="node_id", markers=True),
        key="catalogue_history",
    )


def _mappings(catalogue_id: str, heads: list[str]) -> None:
    """What a head's parameters map tokens to: its OV and QK circuits' top mappings."""
    table = queries.catalogue_mappings(catalogue_id)
    if table.empty:
        return  # a catalogue made before the mappings were stored
    st.subheader("What its parameters map tokens to")
    head = links.selectbox("Head", heads, key="catalogue_head", param="catalogue_head")
    rows = table[table["node_id"] == head]
    st.caption(
        "the tokens each circuit amplifies most, and what it maps them to most: OV, a source "
        "token to the output tokens it promotes (W_E W_V W_O W_U); QK, a query token to the key "
        "tokens it attends to (W_E W_Q W_K^T W_E^T)"
    )
    cols = st.columns(2)
    for col, circuit in zip(cols, ("OV", "QK"), strict=True):
        part = rows[rows["circuit"] == circuit]
        wide = (
            part.groupby(["src_rank", "src_text", "amplification"])["dst_text"]
            .agg(lambda texts: " · ".join(repr(t) for t in texts))
            .reset_index()
            .rename(columns={"src_text": "token", "dst_text": "maps to"})
        )
        wide["token"] = wide["token"].map(repr)
        col.markdown(f"**{circuit}**")
        col.dataframe(
            wide[["token", "amplification", "maps to"]].round(3),
            hide_index=True,
            key=f"catalogue_mappings_{circuit}",
        )
