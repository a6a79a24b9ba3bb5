"""Layer rules: compute never imports duckdb or streamlit; the store never imports torch model
code; the app is read-only. Checked in fresh interpreters."""

import subprocess
import sys

import pytest

RULES = [
    ("workbench.attribution.heads", ["duckdb", "streamlit"]),
    ("workbench.tasks", ["duckdb", "streamlit"]),
    ("workbench.zoo", ["duckdb", "streamlit"]),
    ("workbench.store", ["torch", "transformer_lens", "streamlit"]),
    ("workbench.store.query", ["torch", "transformer_lens", "streamlit"]),
    ("workbench.records", ["torch", "transformer_lens", "duckdb", "streamlit"]),
    ("workbench.sae.attribution", ["duckdb", "streamlit"]),
    ("workbench.sae.features", ["duckdb", "streamlit"]),
    ("workbench.sae.train", ["duckdb", "streamlit"]),
    ("workbench.core", ["torch", "transformer_lens", "duckdb", "streamlit", "pyarrow"]),
    ("workbench.graph", ["torch", "transformer_lens", "duckdb", "streamlit"]),
    ("app.views.circuit", ["torch", "transformer_lens"]),
]


@pytest.mark.parametrize(("module", "forbidden"), RULES)
def test_module_does_not_import(module, forbidden):
    code = f"import sys, {module}; print(','.join(m for m in {forbidden!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"{module} imports {out.stdout.strip()}"


def test_app_never_writes():
    from pathlib import Path

    app_dir = Path(__file__).resolve().parent.parent / "app"
    source = "\n".join(p.read_text() for p in app_dir.rglob("*.py"))
    assert "write_run" not in source and "Store(" not in source
