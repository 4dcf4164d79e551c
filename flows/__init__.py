"""Prefect flows: wiring only. pipeline.py chains the stages of one pipeline run."""
