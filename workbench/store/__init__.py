"""The DuckDB circuit store: schema, migrations, run writes and read-only queries.

Never imports torch or model code: pipelines hand over plain Python values and Arrow tables
(`workbench.rows`: a run's `RunRow` and the rows of the other tables).
"""

from workbench.store.db import DatabaseBusy, Store, default_db_path
from workbench.store.schema import SCHEMA_VERSION

__all__ = ["SCHEMA_VERSION", "DatabaseBusy", "Store", "default_db_path"]
