"""Every pipeline in pipelines.yaml as a Prefect deployment of the pipeline flow, served on its schedule.

    .venv/bin/prefect server start --host 127.0.0.1 --port 4200          # or any Prefect server
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    .venv/bin/popflow serve tiny demo             # deployments preference-pipeline/tiny and .../demo
    .venv/bin/prefect deployment run preference-pipeline/tiny --param 'overrides={"sample": {"n": 4}}' --watch

or, for workers instead of one serving process (a process pool here; Kubernetes or Docker pools alike):

    .venv/bin/prefect work-pool create popflow --type process
    .venv/bin/popflow deploy tiny demo --work-pool popflow
    .venv/bin/prefect worker start --pool popflow

A deployment is named after its pipeline and runs `flows.pipeline.preference_pipeline`. Its schedule is the
pipeline's `schedule:` (nightly at 02:00 UTC unless the pipeline says otherwise, `schedule: null` for none);
serving never pauses it on shutdown. Its parameters are the flow's, with a schema the server enforces when a
run is created, so a bad `--param` fails at `prefect deployment run`, before anything starts:
- `pipeline` is fixed to the deployment's own pipeline;
- `overrides` is a partial pipeline config: either a nested mapping, checked against the JSON schema of
  PipelineConfig (unknown keys and bad values refused), or `key.path=value` strings whose first part must be
  a config section (the rest is checked when the run starts, as `popflow run --set` is);
- `run_id` resumes a failed or killed run (a name: popflow/config/base.py's NAME_PATTERN, as on the CLI);
  `from_stage` reruns from a stage; `data_dir` and `config_path`
  default to what `popflow serve` was given, as absolute paths.
"""

from __future__ import annotations

from pathlib import Path

from popflow.config import DEFAULT_CONFIG, PipelineConfig, load_pipeline, pipeline_names
from popflow.config.base import NAME_PATTERN
from popflow.errors import PopflowError
from popflow.runs import code_version, resolve_data_dir

FLOW_NAME = "preference-pipeline"


def overrides_schema(definitions: dict) -> dict:
    """JSON schema of the `overrides` parameter; PipelineConfig's sub-models go into `definitions`."""
    config = PipelineConfig.model_json_schema(ref_template="#/definitions/{model}")
    definitions.update(config.pop("$defs", {}))
    sections = "|".join(PipelineConfig.model_fields)
    return {
        "title": "overrides", "default": None,
        "description": "Config overrides: a mapping of sections, e.g. {\"sample\": {\"n\": 4}}, or a list of "
                       "\"key.path=value\" strings as in `popflow run --set`.",
        "anyOf": [config, {"type": "array", "items": {"type": "string", "pattern": rf"^({sections})(\.[^=]+)?="}},
                  {"type": "null"}],
    }


def parameter_schema(flow_schema: dict, pipeline: str) -> dict:
    """The flow's own parameter schema with `pipeline` fixed and `overrides` typed (see the module doc)."""
    schema = {**flow_schema, "properties": dict(flow_schema["properties"]),
              "definitions": dict(flow_schema.get("definitions") or {})}
    schema["properties"]["pipeline"] = {**schema["properties"]["pipeline"], "enum": [pipeline]}
    schema["properties"]["overrides"] = overrides_schema(schema["definitions"])
    schema["properties"]["run_id"] = {  # a run id becomes a folder name: refused at `prefect deployment run`
        **schema["properties"]["run_id"], "anyOf": [{"type": "string", "pattern": NAME_PATTERN}, {"type": "null"}]}
    return schema


def build_deployment(pipeline: str, config_path: Path, data_dir: Path):
    """The RunnerDeployment of one pipeline: its schedule, fixed parameters and enforced parameter schema."""
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron
    from prefect.utilities.callables import ParameterSchema

    from flows.pipeline import preference_pipeline

    cfg = load_pipeline(pipeline, config_path)  # an invalid cron or time zone stops here, naming the line
    schedules = [Cron(cfg.schedule.cron, timezone=cfg.schedule.timezone, active=cfg.schedule.active)] \
        if cfg.schedule else []
    deployment = preference_pipeline.to_deployment(
        name=pipeline, description=cfg.description or None, schedules=schedules, tags=["popflow", pipeline],
        parameters={"pipeline": pipeline, "config_path": str(config_path), "data_dir": str(data_dir)},
        entrypoint_type=EntrypointType.MODULE_PATH, version=code_version())
    # Prefect derives the schema from the flow's signature only; RunnerDeployment has no public setter.
    deployment._parameter_openapi_schema = ParameterSchema(
        **parameter_schema(deployment._parameter_openapi_schema.model_dump(), pipeline))
    return deployment


def check_api() -> str:
    """The Prefect API that `serve` registers with: PREFECT_API_URL must be set and answer its health check."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise PopflowError("PREFECT_API_URL is not set: start a server (`.venv/bin/prefect server start --host "
                           "127.0.0.1 --port 4200`) and `export PREFECT_API_URL=http://127.0.0.1:4200/api`")
    with get_client(sync_client=True) as client:
        error = client.api_healthcheck()
    if error is not None:
        raise PopflowError(f"the Prefect API at PREFECT_API_URL={url} is not reachable ({type(error).__name__}: "
                           f"{error}); start the server or correct PREFECT_API_URL")
    return url


def build_deployments(pipelines: list[str], config_path: str | None, data_dir: str | None) -> list:
    """One deployment per named pipeline (default: every pipeline in the file), all validated first."""
    path = Path(config_path or DEFAULT_CONFIG).resolve()
    known = pipeline_names(path)
    unknown = [p for p in pipelines if p not in known]
    if unknown:
        raise PopflowError(f"{path}: no pipeline named {', '.join(map(repr, unknown))}; available: {', '.join(known)}")
    return [build_deployment(p, path, resolve_data_dir(data_dir)) for p in pipelines or known]


def serve(pipelines: list[str], config_path: str | None = None, data_dir: str | None = None,
          limit: int | None = None) -> None:
    """Register the pipelines' deployments and run their flow runs in this process as they come (scheduled or
    `prefect deployment run`), until interrupted."""
    from prefect import serve as prefect_serve

    deployments = build_deployments(pipelines, config_path, data_dir)
    check_api()
    prefect_serve(*deployments, pause_on_shutdown=False, limit=limit)


def deploy(pipelines: list[str], work_pool: str, config_path: str | None = None,
           data_dir: str | None = None) -> list[str]:
    """Register the pipelines' deployments with a work pool and return their names; a worker of that pool
    (`prefect worker start --pool NAME`, started where this checkout and its .venv are) runs them."""
    deployments = build_deployments(pipelines, config_path, data_dir)
    check_api()
    for deployment in deployments:
        deployment.apply(work_pool_name=work_pool)
    return [d.full_name for d in deployments]
