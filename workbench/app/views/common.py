"""Pickers and figures shared by the views: the model, a stored row by its label, a run by
method, task and checkpoint step (each choice linked, `app.links`), and the diverging heatmap."""

from typing import Any

import pandas as pd
import streamlit as st

from workbench.app import links, queries


def select_model(key: str) -> str | None:
    models = queries.models()
    if models.empty:
        st.info("No models stored yet.")
        return None
    return links.selectbox("Model", models["model_id"].tolist(), key=key, param="model")


def pick_row(table: pd.DataFrame, id_column: str, label: str, *, key: str, param: str) -> pd.Series:
    """The row of `table` picked by its id (`id_column`), each shown by its `label` column."""
    ids = table[id_column].tolist()
    labels = dict(zip(ids, table["label"], strict=True))
    chosen = links.selectbox(label, ids, format_func=lambda i: str(labels[i]), key=key, param=param)
    return table[table[id_column] == chosen].iloc[0]


def narrow(
    rows: pd.DataFrame,
    label: str,
    values: str | pd.Series,
    *,
    key: str,
    param: str,
    where: Any = None,
) -> pd.DataFrame:
    """The rows whose value (a column's, or `values` beside the rows) is the one picked among
    the distinct values, in order."""
    column = rows[values] if isinstance(values, str) else values
    chosen = links.selectbox(label, sorted(column.unique()), key=key, param=param, where=where)
    return rows[column == chosen]


def pick_step(runs: pd.DataFrame, key: str, *, slider: bool, where: Any = None) -> pd.Series:
    """The run at the checkpoint step picked (the last by default), on a slider or in a select
    box; its id is linked as `run`."""
    steps = sorted(runs["step"].unique().tolist())
    if slider:
        step = links.select_slider(
            "Checkpoint (training step)", steps, value=steps[-1], key=key, param="step"
        )
    else:
        step = links.selectbox(
            "Checkpoint step", steps, index=len(steps) - 1, key=key, param="step", where=where
        )
    run = runs[runs["step"] == step].iloc[0]
    links.show("run", str(run["run_id"]))
    return run


def pick_run(runs: pd.DataFrame, prefix: str, *, slider: bool) -> pd.Series:
    """One of `runs` (rows with method, task_id, step and run_id): its method and task side by
    side, then its checkpoint step (on a slider below them, or in a select box beside them).
    The widgets' keys are `{prefix}_method`, `{prefix}_task` and `{prefix}_step`."""
    cols = st.columns(2 if slider else 3)
    runs = narrow(runs, "Method", "method", key=f"{prefix}_method", param="method", where=cols[0])
    runs = narrow(runs, "Task", "task_id", key=f"{prefix}_task", param="task", where=cols[1])
    return pick_step(runs, f"{prefix}_step", slider=slider, where=None if slider else cols[2])


def diverging_heatmap(grid: Any, bound: float, labels: dict[str, str], **style: Any) -> Any:
    """Scores as a red-blue heatmap centred on 0 (`bound`: the largest |score|)."""
    import plotly.express as px

    bound = bound or 1.0
    return px.imshow(
        grid,
        color_continuous_scale="RdBu",
        zmin=-bound,
        zmax=bound,
        aspect="auto",
        labels=labels,
        **style,
    )


def clicked_node(key: str) -> str | None:
    """The node last clicked in the chart `key` (its selection, kept by Streamlit in the
    session state), once per new click; read before the page draws anything from it."""
    event = st.session_state.get(key)
    points = (event or {}).get("selection", {}).get("points", [])
    chosen = [p["customdata"] for p in points if p.get("customdata")]
    node = chosen[0] if chosen else None
    if isinstance(node, list):
        node = node[0]
    if node and node != st.session_state.get(f"{key}_last_click"):  # a new click, once
        st.session_state[f"{key}_last_click"] = node
        return str(node)
    return None


def clickable_chart(fig: Any, key: str) -> None:
    """Draw a circuit whose nodes can be clicked (see `clicked_node`)."""
    st.plotly_chart(fig, key=key, on_select="rerun", selection_mode="points")


# run metrics the reliability panel shows (not among a run's other metrics)
RELIABILITY_METRICS = (
    "spot_n",
    "spot_spearman",
    "spot_mae",
    "spot_sign_agreement",
    "faithfulness_sd",
    "faithfulness_lo",
    "faithfulness_hi",
)


def reliability(run_id: str, key: str) -> None:
    """How far to trust a run's numbers: a badge from its spot check (scores measured again by
    real patching; `workbench.spotcheck`) with the sample in an expander, and its circuit's
    faithfulness spread over bootstrap resamples of the prompts."""
    import plotly.express as px

    from workbench.spotcheck import contradicted

    metrics = dict(
        zip(*[queries.run_metrics(run_id)[c].tolist() for c in ("metric", "value")], strict=True)
    )
    if "spot_n" in metrics:
        bad = contradicted(metrics)
        st.badge(
            "contradicted by its spot check" if bad else "spot check agrees",
            color="red" if bad else "green",
            icon=":material/error:" if bad else ":material/check:",
        )
        rho = metrics.get("spot_spearman")
        st.caption(
            f"{int(metrics['spot_n'])} scores patched for real: rank correlation "
            + (f"{rho:.2f}" if rho is not None else "undefined (one side constant)")
            + f", signs agreeing {metrics['spot_sign_agreement']:.0%}, mean |estimate − exact| "
            f"{metrics['spot_mae']:.3f} of the clean-vs-corrupt gap"
        )
        with st.expander("Spot check: each estimate against exact patching"):
            sample = queries.spot_check(run_id)
            fig = px.scatter(
                sample, x="exact", y="estimate", color="sample", hover_name="item",
                labels={"exact": "exact patching", "estimate": "the method's estimate"},
            )  # fmt: skip
            bound = float(sample[["exact", "estimate"]].abs().to_numpy().max() or 1.0)
            fig.add_shape(
                type="line", x0=-bound, y0=-bound, x1=bound, y1=bound, line={"dash": "dot"}
            )
            st.plotly_chart(fig, key=f"{key}_spot_plot")
            st.dataframe(sample.round(4), hide_index=True, key=f"{key}_spot_table")
    if "faithfulness_sd" in metrics:
        st.caption(
            f"circuit faithfulness over resampled prompts: sd {metrics['faithfulness_sd']:.3f}, "
            f"95% of resamples in [{metrics['faithfulness_lo']:.3f}, "
            f"{metrics['faithfulness_hi']:.3f}]"
        )
