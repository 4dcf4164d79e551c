"""popflow's stages, one module each, in the order the pipeline runs them:

    prompts (ingest) -> sample -> score -> pair -> annotate -> margins -> ref_logps -> train -> evaluate
    import_pairs replaces ingest/sample/score/pair when a pipeline imports its pairs
    promote closes a round of an on-policy loop (pipelines with `loop:`)

Each stage module has pure functions first and one `@stage` function last that declares the stage (the
stages it reads from, its config sections, the tables it writes) and does its I/O; popflow/stage.py does
the bookkeeping and flows/pipeline.py lists the stages. No stage module imports another: what two stages
share lives in tasks/rewards/ (reward kinds, scoring, aggregation), tasks/trainer.py and tasks/losses.py
(the TRL subclass and its losses), or the core package (popflow/engines.py, popflow/sources.py, ...).
"""
