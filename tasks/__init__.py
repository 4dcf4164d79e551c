"""popflow's stages, one module each: prompts (ingest), sample, score, pair.

Each module has pure functions first and one thin Prefect @task at the end that reads its inputs from the
lake, calls them, and writes its outputs (see flows/pipeline.py for the wiring).
"""
