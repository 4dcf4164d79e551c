"""popflow: on-policy preference data and preference optimisation as a staged Prefect pipeline over a
Parquet lake: sample -> score -> seven-point pairs -> PoP annotation -> margins -> DPO-PoP training -> evaluation.

This package is the core the stages (tasks/) and flows (flows/) build on; nothing in it imports them,
except the CLI (popflow/cli.py), which sits on top of the flows.

Run a pipeline:  .venv/bin/popflow run tiny
Query the lake:  .venv/bin/popflow sql "select * from pairs limit 5"
"""

__version__ = "0.1.0"
