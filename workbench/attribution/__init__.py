"""Pure-torch attribution methods. Never imports duckdb or streamlit."""
