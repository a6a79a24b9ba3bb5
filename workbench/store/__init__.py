"""The DuckDB circuit store: schema, migrations, run writes and read-only queries.

Never imports torch or model code: pipelines hand over plain Python values and Arrow tables.
"""

from workbench.store.db import DatabaseBusy, RunRecord, Store, default_db_path
from workbench.store.schema import SCHEMA_VERSION

__all__ = ["SCHEMA_VERSION", "DatabaseBusy", "RunRecord", "Store", "default_db_path"]
