"""Selectors shared by the views."""

from typing import Any

import streamlit as st

from workbench.app import links, queries


def select_model(key: str) -> str | None:
    models = queries.models()
    if models.empty:
        st.info("No models stored yet.")
        return None
    return links.selectbox("Model", models["model_id"].tolist(), key=key, param="model")


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
