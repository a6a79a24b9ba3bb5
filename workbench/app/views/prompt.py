"""Prompt: one prompt at one checkpoint, looked at closely. Attention patterns per head, the
logit lens across layers, direct logit attribution per head and MLP for the predicted token,
attention rollout and attention flow, the information-flow routes graph, why this token (input
attribution by every method, faithfulness curves, agreement: `workbench.app.views.why`) and
Patchscope.

The app stays free of torch: "Analyse" starts `workbench run prompt` in a process of its own
(through `app.access.launch`: not in read-only mode, within the server's bound on processes and
their timeout; a task must be a built-in name or a file in an allowed directory), shows its
progress, and the page then reads what it stored (tables `prompt_*`). The job is kept in the
session, so a rerun while it runs picks it up again."""

import re
import sys

import numpy as np
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from workbench.app import access, data, links, queries
from workbench.app.views import why
from workbench.app.views.common import diverging_heatmap, pick_row, select_model
from workbench.errors import BadInput

ROUTE_COLOURS = {"attention": "#1f77b4", "residual": "#999999", "mlp": "#2ca02c"}
JOB = "prompt_job"  # session state: the analysis this session started and has not shown yet
ANALYSING = "The prompt analysis"


def render() -> None:
    st.header("Prompt")
    model_id = select_model("prompt_model")
    if model_id is None:
        return
    _analyse(model_id)
    stored = queries.prompts_analysed(model_id)
    if stored.empty:
        above = "" if access.read_only() else "analyse one above, or "
        st.info(f"No prompt analysed for this model yet: {above}run "
                "`workbench run prompt --model ... --text ...`.")  # fmt: skip
        return
    row = pick_row(stored, "prompt_id", "Prompt", key="prompt_pick", param="prompt")
    pid = str(row["prompt_id"])
    tokens = [f"{i}:{t}" for i, t in enumerate(row["tokens"])]
    st.caption(
        f"prompt `{pid}` at step {row['step']} · {len(tokens)} tokens · predicted next token: "
        f"{access.literal(row['predicted'])}"
    )
    tabs = st.tabs(
        [
            "Attention",
            "Logit lens",
            "Direct logit attribution",
            "Rollout and flow",
            "Routes",
            "Why this token",
            "Patchscope",
        ]
    )
    shape = queries.model_shape(model_id)
    n_layers, n_heads = int(shape["n_layers"][0]), int(shape["n_heads"][0])
    with tabs[0]:
        _attention(pid, tokens, n_layers, n_heads)
    with tabs[1]:
        _lens(pid, tokens, str(row["predicted"]))
    with tabs[2]:
        _dla(pid, str(row["predicted"]))
    with tabs[3]:
        _flow(pid, tokens)
    with tabs[4]:
        _routes(pid, tokens, float(row["tau"]))
    with tabs[5]:
        why.render_why(pid, list(row["tokens"]))
    with tabs[6]:
        why.render_patchscope(pid, list(row["tokens"]))


def _analyse(model_id: str) -> None:
    with st.expander("Analyse a prompt", expanded=False):
        if access.require_writable("Analysing a prompt"):
            _analyse_form(model_id)
    job = st.session_state.get(JOB)
    if job is not None:
        _follow(job)


def _analyse_form(model_id: str) -> None:
    checkpoints = queries.model_source(model_id)
    steps = checkpoints["step"].tolist()
    c1, c2 = st.columns([1, 3])
    step = c1.selectbox("Checkpoint step", steps, index=len(steps) - 1, key="prompt_step")
    text = c2.text_input("Prompt text", key="prompt_text")
    c3, c4 = st.columns([3, 1])
    task = c3.text_input(
        "…or a task's prompt: task (built-in name or JSONL)", key="prompt_task", help=_task_help()
    )
    index = c4.number_input("index", min_value=0, value=0, step=1, key="prompt_index")
    if not st.button("Analyse", key="prompt_analyse"):
        return
    if not text.strip() and not task.strip():
        st.warning("Type a prompt, or name a task and the index of one of its prompts.")
        return
    source = str(checkpoints["source"].iloc[0])
    cmd = [sys.executable, "-m", "workbench", "run", "prompt", f"--model={source}"]
    cmd += [f"--checkpoint={step}", f"--db={data.db_path()}"]
    if text.strip():
        cmd.append(f"--text={text}")
    else:
        try:
            cmd += [f"--task={access.check_task(task)}", f"--index={int(index)}"]
        except BadInput as err:
            st.error(access.plain(err))
            return
    job = access.launch(cmd, what=ANALYSING)
    if job is not None:
        st.session_state[JOB] = job


def _task_help() -> str:
    dirs = access.policy().task_dirs
    names = ", ".join(access.BUILTIN_TASKS)
    if not dirs:
        return f"A built-in task ({names}); this app reads no task files."
    return f"A built-in task ({names}) or a JSONL file in {', '.join(map(access.literal, dirs))}."


def _follow(job: access.Job) -> None:
    """Show the analysis's progress until it ends (a rerun meanwhile comes back here), then
    its failure or its prompt."""
    succeeded = access.wait(job, label="Analysing the prompt")
    del st.session_state[JOB]
    if not succeeded:
        return
    found = re.search(r"prompt (p-[0-9a-f]+)", job.stdout())
    data.query.clear()  # type: ignore[attr-defined]  # (the new prompt shows at once)
    if found:
        st.session_state["prompt_pick"] = found.group(1)


def _attention(pid: str, tokens: list[str], n_layers: int, n_heads: int) -> None:
    c1, c2 = st.columns(2)
    layer = int(links.number("Layer", 0, max(n_layers - 1, 1), 0, key="prompt_layer",
                             param="layer", where=c1, slider=n_layers > 1))  # fmt: skip
    head = int(links.number("Head", 0, max(n_heads - 1, 1), 0, key="prompt_head",
                            param="head", where=c2, slider=n_heads > 1))  # fmt: skip
    pattern = queries.prompt_attention(pid, min(layer, n_layers - 1), min(head, n_heads - 1))
    n = len(tokens)
    grid = np.full((n, n), np.nan)
    grid[pattern["query_pos"], pattern["key_pos"]] = pattern["weight"]
    fig = px.imshow(
        grid,
        x=tokens,
        y=tokens,
        zmin=0,
        zmax=1,
        color_continuous_scale="Blues",
        labels={"x": "key (attended to)", "y": "query", "color": "attention"},
        aspect="auto",
    )
    st.plotly_chart(fig, key="prompt_attention_map")


def _lens(pid: str, tokens: list[str], predicted: str) -> None:
    lens = queries.prompt_lens(pid)
    fig = _lens_figure(lens, tokens, predicted, lambda i: f"after layer {i}")
    st.caption(
        f"colour: the probability of {access.literal(predicted)} (the model's prediction) read "
        "off each layer's residual; text: that layer's most likely next token"
    )
    tuned = queries.prompt_tuned_lens(pid)
    if tuned.empty:
        st.plotly_chart(fig, key="prompt_lens_map")
        st.caption("No tuned lens for this checkpoint: `workbench run tuned-lens` trains one.")
        return
    c1, c2 = st.columns(2)
    c1.caption("logit lens")
    c1.plotly_chart(fig, key="prompt_lens_map")
    final = int(tuned["layer"].max())

    def stream(i: int) -> str:  # the tuned lens's row i reads the stream before block i
        return "embeddings" if i == 0 else "final" if i == final else f"after layer {i - 1}"

    c2.caption(
        f"tuned lens `{tuned['lens_id'].iloc[0]}`: each layer's residual through its trained "
        "translator, then the final normalisation and the unembedding"
    )
    c2.plotly_chart(_lens_figure(tuned, tokens, predicted, stream), key="prompt_tuned_lens_map")


def _lens_figure(lens, tokens: list[str], predicted: str, label) -> go.Figure:  # type: ignore[no-untyped-def]
    """A lens's grid: rows by `label(layer)`, positions across, coloured by the probability of
    the prediction, each cell labelled with that row's top token."""
    prob = lens.pivot_table(index="layer", columns="position", values="predicted_prob")
    top = lens.pivot_table(index="layer", columns="position", values="top_token", aggfunc="first")
    fig = px.imshow(
        prob.values,
        x=tokens,
        y=[label(int(i)) for i in prob.index],
        zmin=0,
        zmax=1,
        color_continuous_scale="Viridis",
        labels={"x": "position", "y": "", "color": f"p({predicted})"},
        aspect="auto",
    )
    fig.update_traces(text=top.values, texttemplate="%{text}")
    return fig


def _dla(pid: str, predicted: str) -> None:
    dla = queries.prompt_dla(pid).head(20)
    fig = px.bar(dla, x="score", y="node_id", orientation="h")
    fig.update_yaxes(autorange="reversed")
    st.caption(
        "direct contribution of each head and MLP to the logit of "
        f"{access.literal(predicted)} (minus the mean logit) at the last position"
    )
    st.plotly_chart(fig, key="prompt_dla_bars")
    st.dataframe(dla, hide_index=True, key="prompt_dla_table")


def _flow(pid: str, tokens: list[str]) -> None:
    flow = queries.prompt_flow(pid)
    cols = st.columns(2)
    for col, method in zip(cols, ("rollout", "flow"), strict=True):
        part = flow[flow["method"] == method]
        grid = part.pivot_table(index="layer", columns="position", values="score")
        fig = diverging_heatmap(
            grid.values,
            float(np.nanmax(np.abs(grid.values))) if grid.size else 1.0,
            {"x": "input position", "y": "after layer", "color": method},
            x=tokens,
        )
        col.caption(f"attention {method}: how much the last position draws on each input")
        col.plotly_chart(fig, key=f"prompt_{method}_map")


def _routes(pid: str, tokens: list[str], tau: float) -> None:
    routes = queries.prompt_routes(pid)
    st.caption(f"information-flow routes (importance ≥ {tau}) that reach the last position's "
               "final residual; x: position, y: layer")  # fmt: skip
    if routes.empty:
        st.info("No route reaches the last position at this threshold.")
        return
    fig = go.Figure()
    for kind, colour in ROUTE_COLOURS.items():
        part = routes[routes["kind"] == kind]
        xs: list[float | None] = []
        ys: list[float | None] = []
        for r in part.itertuples():
            offset = 0.15 if kind == "mlp" else 0.0
            xs += [r.src_pos + offset, r.dst_pos + offset, None]
            ys += [r.src_layer, r.dst_layer, None]
        if xs:
            fig.add_trace(
                go.Scatter(x=xs, y=ys, mode="lines", line={"color": colour, "width": 2}, name=kind)
            )
    nodes = {(r.src_pos, r.src_layer) for r in routes.itertuples()}
    nodes |= {(r.dst_pos, r.dst_layer) for r in routes.itertuples()}
    fig.add_trace(
        go.Scatter(
            x=[p for p, _ in nodes],
            y=[layer for _, layer in nodes],
            mode="markers",
            marker={"size": 8, "color": "#444"},
            hovertext=[f"{tokens[p]} before layer {layer}" for p, layer in nodes],
            hoverinfo="text",
            name="residual stream",
        )
    )
    fig.update_layout(
        xaxis={"tickvals": list(range(len(tokens))), "ticktext": tokens, "title": "position"},
        yaxis={"title": "layer (residual stream before it)", "dtick": 1},
        height=520,
    )
    st.plotly_chart(fig, key="prompt_routes_graph")
    st.dataframe(routes, hide_index=True, key="prompt_routes_table")
