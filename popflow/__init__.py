"""popflow: on-policy preference data (sample -> score -> seven-point pairs) in a Parquet lake.

Run a pipeline:  .venv/bin/popflow run tiny
Query the lake:  .venv/bin/popflow sql "select * from pairs limit 5"
"""

__version__ = "0.1.0"
