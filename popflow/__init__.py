"""popflow: on-policy preference data and preference optimisation as a staged Prefect pipeline over a
Parquet lake: sample -> score -> seven-point pairs -> PoP annotation -> margins -> DPO-PoP training -> evaluation,
and, as an on-policy loop, promotion of the trained policy that the next round samples (popflow/lineage.py).

This package is the core the stages (tasks/) and flows (flows/) build on; nothing in it imports them,
except the CLI (popflow/cli.py), which sits on top of the flows.

Run a pipeline:  .venv/bin/popflow run tiny
Query the lake:  .venv/bin/popflow sql "select * from pairs limit 5"
Loop rounds:     .venv/bin/popflow loop tiny_loop --rounds 2
"""

__version__ = "0.1.0"
