"""Selectors shared by the views."""

import streamlit as st

from app import queries


def select_model(key: str) -> str | None:
    models = queries.models()
    if models.empty:
        st.info("No models stored yet.")
        return None
    return st.selectbox("Model", models["model_id"].tolist(), key=key)
