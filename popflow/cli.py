"""The `popflow` command.

    popflow run PIPELINE [--config FILE] [--set key.path=value ...] [--data-dir DIR] [--run-id ID]
                         [--from-stage STAGE] [--verbose]
    popflow loop PIPELINE --rounds N [--config FILE] [--set ...] [--data-dir DIR]
                                             an on-policy loop until the chain has N rounds (resumable)
    popflow policies [PIPELINE] [--data-dir DIR]   a loop's lineage: every round's candidate and verdict
    popflow sql "SELECT ..." [--data-dir DIR] [--csv]
    popflow runs [--data-dir DIR]
    popflow validate [--config FILE]         validate every pipeline in the file
    popflow models [--data-dir DIR]          materialise the built-in models (make setup does this)
    popflow doctor [PIPELINE] [--no-sample]  this machine, the dtype each stage will use, a sampling check
    popflow serve [PIPELINE ...] [--config FILE] [--data-dir DIR] [--limit N]
                                             Prefect deployments on their schedules (needs PREFECT_API_URL)
    popflow deploy [PIPELINE ...] --work-pool POOL [--config FILE] [--data-dir DIR]
                                             the same deployments, for the workers of a work pool

--data-dir defaults to $POPFLOW_DATA_DIR, else ./data. Bad input exits with status 2 and one message that
names the key, file:line or row; nothing is written.
"""

from __future__ import annotations

import argparse
import logging
import sys

from popflow.errors import PopflowError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="popflow", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    # argument groups several commands share
    one = argparse.ArgumentParser(add_help=False)
    one.add_argument("pipeline")
    one.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                     help="override one config value (YAML-parsed); repeatable")
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("--config", help="another pipelines file of the same format")
    data = argparse.ArgumentParser(add_help=False)
    data.add_argument("--data-dir", help="the lake's folder (default: $POPFLOW_DATA_DIR, else ./data)")
    loud = argparse.ArgumentParser(add_help=False)
    loud.add_argument("--verbose", action="store_true", help="engine logs at INFO and vLLM's progress bars "
                      "(default: WARNING; popflow logs its own progress)")
    several = argparse.ArgumentParser(add_help=False)
    several.add_argument("pipelines", nargs="*", metavar="PIPELINE", help="default: every pipeline in the file")

    run = sub.add_parser("run", parents=[one, config, data, loud], help="run (or resume) a pipeline under Prefect")
    run.add_argument("--run-id", help="resume this run id (same config) instead of starting a new run")
    run.add_argument("--from-stage", help="with --run-id: rerun this stage and the later ones on the run's data")
    exp = sub.add_parser("experiment", parents=[one, config, data, loud],
                         help="train the pipeline's experiment methods x seeds; comparison table")
    exp.add_argument("--run-id", help="resume this experiment run id")

    export = sub.add_parser("export", parents=[config, data], help="write a run's pairs as a Hugging Face dataset "
                            "folder with its card (docs/export.md)")
    export.add_argument("pipeline")
    export.add_argument("--to", required=True, help="the dataset folder to write")
    export.add_argument("--run-id", help="this run (default: the pipeline's latest completed run)")
    export.add_argument("--strategy", help="this pair strategy (default: the one the run trains on)")
    export.add_argument("--force", action="store_true", help="replace a non-empty --to folder")
    export.add_argument("--hub", metavar="REPO", help="then push the folder to this Hub dataset repo (needs a token "
                        "and the network)")

    annotate = sub.add_parser("annotate", help="PoP comparisons for people: export them as Label Studio tasks, "
                              "import the answers as the run's PoP labels")
    act = annotate.add_subparsers(dest="action", required=True)
    tasks_out = act.add_parser("export", parents=[one, config, data], help="write a run's comparisons as tasks")
    tasks_out.add_argument("--run-id", required=True, help="the run whose pairs are compared")
    tasks_out.add_argument("--to", required=True, help="the folder for tasks.json and labeling_config.xml")
    answers_in = act.add_parser("import", parents=[one, config, data, loud],
                                help="rerun the run from annotate on people's answers (a Label Studio export)")
    answers_in.add_argument("answers", help="Label Studio's JSON or JSON-MIN export of the tasks")
    answers_in.add_argument("--run-id", required=True, help="the run the tasks were exported from")

    loop = sub.add_parser("loop", parents=[one, config, data, loud],
                          help="run an on-policy loop pipeline until its chain has --rounds rounds")
    loop.add_argument("--rounds", type=int, required=True, help="the number of complete rounds to reach (a rerun "
                      "resumes an unfinished round and never repeats one)")
    policies = sub.add_parser("policies", parents=[data], help="the lineage of loop pipelines' policies")
    policies.add_argument("pipeline", nargs="?", help="one pipeline (default: all)")

    report = sub.add_parser("report", parents=[data], help="a run's policies against the base policy: figures "
                            "with 95%% intervals and a verdict each")
    report.add_argument("pipeline")
    report.add_argument("--run-id", help="this run (default: the pipeline's latest complete run)")
    sql = sub.add_parser("sql", parents=[data], help="query the lake's catalog with DuckDB SQL")
    sql.add_argument("query")
    sql.add_argument("--csv", action="store_true", help="print CSV instead of a table")
    sub.add_parser("runs", parents=[data], help="list runs")
    sub.add_parser("validate", parents=[config], help="validate every pipeline of a config file")
    sub.add_parser("models", parents=[data], help="materialise the built-in models")
    doctor = sub.add_parser("doctor", parents=[loud], help="what this machine is and what popflow will do on it")
    doctor.add_argument("pipeline", nargs="?", default="demo", help="whose stage dtypes to show (default: demo)")
    doctor.add_argument("--no-sample", action="store_true", help="skip the short vLLM sampling measurement")

    serve = sub.add_parser("serve", parents=[several, config, data, loud],
                           help="serve pipelines as Prefect deployments on their schedules")
    serve.add_argument("--limit", type=int, help="at most this many flow runs at once (default: no limit)")
    deploy = sub.add_parser("deploy", parents=[several, config, data],
                            help="register pipelines as deployments of a work pool (run by its workers)")
    deploy.add_argument("--work-pool", required=True, help="an existing work pool (prefect work-pool create)")
    return parser


def checked(args):
    """The pipeline's config after every check that needs no model (names, config, sources, model paths,
    reward functions, the promoted policies a run would pin): bad input stops here, before Prefect starts. The
    config goes to the flow the command starts next (flows.preflight.hand_over), which checks it no more."""
    from flows.preflight import hand_over, preflight
    from popflow.config import load_pipeline
    from popflow.config.base import check_name

    if getattr(args, "run_id", None):
        check_name(args.run_id, "--run-id")
    cfg = load_pipeline(args.pipeline, args.config, args.overrides)
    preflight(cfg, args.config)
    from popflow.lineage import prepare_run, uses_promoted

    if uses_promoted(cfg):  # the promoted files this run would pin exist and are unchanged
        from popflow.lake import Lake
        from popflow.runs import resolve_data_dir

        prepare_run(cfg, args.pipeline, Lake(resolve_data_dir(args.data_dir)), getattr(args, "run_id", None),
                    args.config, getattr(args, "from_stage", None))
    hand_over(args.pipeline, args.config, args.overrides, cfg)
    return cfg


def cmd_run(args) -> int:
    checked(args)
    from flows.pipeline import preference_pipeline

    result = preference_pipeline(pipeline=args.pipeline, overrides=args.overrides, data_dir=args.data_dir,
                                 run_id=args.run_id, config_path=args.config, from_stage=args.from_stage)
    print(f"run {result['run_id']} completed")
    for stage, info in result["stages"].items():
        tables = ", ".join(f"{t}={n}" for t, n in info["tables"].items())
        print(f"  {stage:8s} {tables}{'  (already complete)' if info['skipped'] else ''}")
    return 0


def cmd_sql(args) -> int:
    import duckdb

    from popflow.lake import Lake
    from popflow.runs import resolve_data_dir

    lake = Lake(resolve_data_dir(args.data_dir))
    if not lake.root.is_dir():
        raise PopflowError(f"no lake at {lake.root}: run a pipeline first (or pass --data-dir)")
    con = lake.connect()
    from popflow.sql import check_query

    check_query(con, args.query)
    try:
        rel = con.sql(args.query)
    except duckdb.Error as exc:
        raise PopflowError(f"SQL error: {exc}") from None
    if rel is None:
        return 0
    if args.csv:
        import csv

        writer = csv.writer(sys.stdout)
        writer.writerow(rel.columns)
        writer.writerows(rel.fetchall())
    else:
        rel.show(max_rows=10_000, max_width=200)
    return 0


def cmd_runs(args) -> int:
    args.query = ("select pipeline, run_id, status, started_at, finished_at, config_hash, code_version "
                  "from runs order by started_at")
    args.csv = False
    return cmd_sql(args)


def cmd_loop(args) -> int:
    from flows.loop import check_loop, preference_loop

    check_loop(checked(args), args.pipeline, args.rounds)

    result = preference_loop(pipeline=args.pipeline, rounds=args.rounds, overrides=args.overrides,
                             data_dir=args.data_dir, config_path=args.config)
    print(f"loop {args.pipeline}: {result['length']} rounds")
    for r in result["rounds"]:
        win = "" if r["win_rate"] is None else f"win rate {r['win_rate']:.3f} (bound {r['win_lower']:.3f})"
        print(f"  round {r['round']} run {r['run_id']}  {win}  {'promoted' if r['promoted'] else 'not promoted'}: "
              f"{r['reason']}")
    return 0


def lake_with_runs(data_dir: str | None, pipeline: str | None):
    """The lake, once `pipeline` (when named) is known to have runs there; else one line naming those that do."""
    from popflow.lake import Lake
    from popflow.runs import resolve_data_dir

    lake = Lake(resolve_data_dir(data_dir))
    if pipeline and not lake.read_runs(pipeline):
        raise PopflowError(f"pipeline {pipeline!r} has no runs in {lake.root}; pipelines with runs: "
                           f"{', '.join(lake.pipelines()) or 'none'}")
    return lake


def cmd_policies(args) -> int:
    from popflow.config.base import check_name
    from popflow.sql import lit

    where = f"where pipeline = {lit(check_name(args.pipeline, 'pipeline'))}" if args.pipeline else ""
    args.query = ("select pipeline, round, run_id, method || '-s' || seed as candidate, "
                  "case when parent_round = 0 then 'base' else 'round ' || parent_round end as sampled, "
                  "reference_kind as reference, pairs, "
                  "round(win_rate, 3) as win_rate, round(win_lower, 3) as win_lower, "
                  "round(heldout_accuracy, 3) as heldout_acc, promoted, reason "
                  f"from loop_rounds {where} order by pipeline, round")
    args.csv = False

    lake = lake_with_runs(args.data_dir, args.pipeline)
    if "lineage" not in lake.tables():
        print("no loop rounds yet (a pipeline with a loop: section records one per run)")
        return 0
    code = cmd_sql(args)
    if code == 0 and args.pipeline:
        print(climb(lake, args.pipeline))
    return code


def climb(lake, pipeline: str) -> str:
    """The held-out reward of each round's sampled policy and the last candidate (popflow/report.py:climb_sql)."""
    from popflow.report import climb_sql, render_climb

    if not {"rewards", "prompts", "eval_rewards"} <= set(lake.tables()):
        return ""
    rows = lake.connect().sql(climb_sql(pipeline)).to_arrow_table().to_pylist()
    if not rows:
        return ""
    return (f"\nheld-out reward of {pipeline}'s policies, 95% intervals over prompts (gains paired by prompt: vs "
            f"base against round 1's sampled policy, vs previous against the policy above):\n{render_climb(rows)}")


def cmd_report(args) -> int:
    from popflow.config.base import check_name
    from popflow.report import metrics_sql, render

    check_name(args.pipeline, "pipeline")
    if args.run_id:
        check_name(args.run_id, "--run-id")
    lake = lake_with_runs(args.data_dir, args.pipeline)
    rows = [] if "eval_metrics" not in lake.tables() else \
        lake.connect().execute(metrics_sql(args.pipeline, args.run_id)).fetchall()
    if not rows:
        which = f"run {args.run_id}" if args.run_id else "its latest complete run"
        raise PopflowError(f"pipeline {args.pipeline!r}: no evaluation in {which} (train and evaluate write one)")
    print(render(args.pipeline, rows))
    return 0


def cmd_validate(args) -> int:
    from flows.preflight import preflight
    from popflow.config import load_pipeline, pipeline_names

    for name in pipeline_names(args.config):
        preflight(load_pipeline(name, args.config), args.config)  # hub ids are not fetched: they load at run time
        print(f"{name}: ok")
    return 0


def cmd_models(args) -> int:
    from popflow import models
    from popflow.runs import resolve_data_dir

    for ref in models.BUILTINS:
        resolved = models.resolve(ref, resolve_data_dir(args.data_dir))
        print(f"{ref:32s} {resolved.path}  {resolved.fingerprint}")
    return 0


def cmd_doctor(args) -> int:
    from popflow.doctor import diagnose, render

    found = diagnose(args.pipeline, sample=not args.no_sample)
    print(render(found))
    return 1 if found.broken else 0


def cmd_serve(args) -> int:
    from flows.deployments import serve

    serve(args.pipelines, args.config, args.data_dir, args.limit)
    return 0


def cmd_deploy(args) -> int:
    from flows.deployments import deploy

    for name in deploy(args.pipelines, args.work_pool, args.config, args.data_dir):
        print(f"deployment {name} -> work pool {args.work_pool}")
    return 0


def cmd_experiment(args) -> int:
    checked(args)
    from flows.experiment import preference_experiment

    result = preference_experiment(pipeline=args.pipeline, overrides=args.overrides, data_dir=args.data_dir,
                                   run_id=args.run_id, config_path=args.config)
    from flows.experiment import LEGEND

    print(f"experiment run {result['run_id']} completed ({LEGEND})\n{result['comparison']}")
    print(f"plot: {result['plot']}")
    return 0


def cmd_export(args) -> int:
    from pathlib import Path

    from popflow.config import load_pipeline
    from popflow.export import export, push

    lake = lake_with_runs(args.data_dir, args.pipeline)
    out = export(lake, load_pipeline(args.pipeline, args.config), args.pipeline, args.run_id, args.strategy,
                 Path(args.to), args.force)
    splits = ", ".join(f"{k} {v}" for k, v in out["splits"].items())
    print(f"exported run {out['run_id']} ({out['strategy']}: {splits} pairs) to {out['folder']}")
    if args.hub:
        print(f"pushed to {push(Path(out['folder']), args.hub)}")
    return 0


def cmd_annotate(args) -> int:
    import json
    from pathlib import Path

    if args.action == "export":
        from flows.labels import export_tasks

        out = export_tasks(args.pipeline, args.run_id, args.overrides, args.config, args.data_dir, Path(args.to))
        counts = ", ".join(f"{n} {s}" for s, n in out["comparisons"].items())
        print(f"{counts} comparisons of run {args.run_id}: {out['tasks']} (labeling interface: "
              f"{out['labeling_config']}); import into Label Studio, label, export JSON, then `popflow annotate "
              f"import {args.pipeline} ANSWERS --run-id {args.run_id}`")
        return 0
    # import: the run again from annotate, on the answers (the margins, training and evaluation follow)
    args.overrides = [*args.overrides, f"annotate.labels={json.dumps(str(Path(args.answers).resolve()))}"]
    args.from_stage = "annotate"
    return cmd_run(args)


COMMANDS = {"run": cmd_run, "experiment": cmd_experiment, "loop": cmd_loop, "policies": cmd_policies,
            "report": cmd_report, "sql": cmd_sql, "runs": cmd_runs,
            "validate": cmd_validate, "models": cmd_models, "serve": cmd_serve,
            "deploy": cmd_deploy, "doctor": cmd_doctor, "export": cmd_export, "annotate": cmd_annotate}


def main(argv: list[str] | None = None) -> int:
    import os

    # The ephemeral server's telemetry heartbeat has nowhere to go offline and races its own SQLite file.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from popflow import logs

    if args.command == "doctor" and not args.verbose:  # one screen: the engine's start-up warnings are noise here
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    logs.configure(getattr(args, "verbose", False))
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per API call drowns `serve`'s own output
    flows = args.command in ("run", "loop", "experiment") or getattr(args, "action", None) == "import"
    if flows:
        logs.quiet_console_tracebacks()
    try:
        if flows and not os.environ.get("PREFECT_API_URL"):
            from popflow import tempserver

            tempserver.detach()  # a terminal's Ctrl-C reaches popflow, not Prefect's temporary server
        return COMMANDS[args.command](args)
    except PopflowError as err:
        print(f"popflow: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        again = "the same command" if args.command == "loop" else "with the same --run-id"
        print(f"popflow: interrupted; rerun {again} to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # not bad input: its root cause once, the traceback in a file
        if logs.verbose():
            raise
        print(unexpected(exc), file=sys.stderr)
        return 1
    finally:
        if "flows.preflight" in sys.modules:  # a config checked for a flow that never took it goes too
            sys.modules["flows.preflight"].forget()


def unexpected(exc: BaseException) -> str:
    """One line for an error that is not bad input: its type and root cause (a replica's own, when the message
    carries one: popflow/replicas.py), and the file its full traceback was written to."""
    import os
    import tempfile
    import time
    import traceback
    from pathlib import Path

    path = Path(tempfile.gettempdir()) / f"popflow-error-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.txt"
    path.write_text("".join(traceback.format_exception(exc)))
    def inner(e: BaseException) -> BaseException | None:  # what it was raised from (`from None` hides it)
        return e.__cause__ or (None if e.__suppress_context__ else e.__context__)

    chain = [exc]  # the error, what it was raised from, ... down to the innermost
    while inner(chain[-1]) is not None and len(chain) < 20:
        chain.append(inner(chain[-1]))
    lines = [ln for e in chain for ln in str(e).splitlines()]
    causes = [ln[ln.index("root cause: "):] for ln in lines if "root cause: " in ln]  # a replica's, when told
    root = chain[-1]
    first = next((ln.strip() for ln in str(root).splitlines() if ln.strip()), "")
    cause = causes[-1] if causes else (first if root is exc else f"root cause: {type(root).__name__}: {first}")
    return (f"popflow: error: unexpected {type(exc).__name__}: {cause[:1000]} (full traceback: {path}; --verbose "
            "prints it)")


if __name__ == "__main__":
    sys.exit(main())
