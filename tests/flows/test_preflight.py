"""One check phase per run (flows/preflight.py): the CLI loads and preflights a pipeline's config and hands it to
the flow it starts, which checks it no more; a run without the CLI checks once in the flow."""

from __future__ import annotations

import flows.pipeline
import flows.preflight
from flows.preflight import checked, forget, hand_over, handing_over
from popflow import cli, config
from tests.conftest import REPO


def counting(monkeypatch) -> dict:
    """Count every config load and preflight, whoever calls them (the CLI imports them at call time, the flows
    module through its own name)."""
    calls = {"load": 0, "preflight": 0}
    real_load, real_preflight = config.load_pipeline, flows.preflight.preflight

    def load(*args, **kwargs):
        calls["load"] += 1
        return real_load(*args, **kwargs)

    def preflight(*args, **kwargs):
        calls["preflight"] += 1
        return real_preflight(*args, **kwargs)

    monkeypatch.setattr(config, "load_pipeline", load)
    monkeypatch.setattr(flows.preflight, "load_pipeline", load)
    monkeypatch.setattr(flows.preflight, "preflight", preflight)
    return calls


def test_a_cli_run_loads_and_checks_its_config_once(monkeypatch, capsys):
    """`popflow run tiny --set sample.n=3` through the CLI, its flow replaced by one that gets its config as the
    real flow does (flows.preflight.checked): one load and one preflight in all, and the flow sees the CLI's
    overrides. The handed-over config is taken, not kept: a second run in the same process (a served pipeline's
    next night) loads and checks again; one handed to a flow that never took it is forgotten when the flow
    returns; the config file's key is its resolved path."""
    calls, seen = counting(monkeypatch), []

    def flow(pipeline, overrides, data_dir, run_id, config_path, from_stage):
        seen.append(checked(pipeline, config_path, flows.pipeline.as_assignments(overrides)))
        return {"run_id": "r", "stages": {}}

    monkeypatch.setattr(flows.pipeline, "preference_pipeline", flow)
    assert cli.cmd_run(cli._parser().parse_args(["run", "tiny", "--set", "sample.n=3"])) == 0  # (main's set-up aside)
    assert calls == {"load": 1, "preflight": 1} and seen[0].sample.n == 3
    checked("tiny", None, ["sample.n=3"])
    assert calls == {"load": 2, "preflight": 2}
    hand_over("tiny", None, ["sample.n=3"], seen[0])
    assert checked("tiny", None, ["sample.n=4"]).sample.n == 4  # other arguments: not the handed-over config
    assert calls == {"load": 3, "preflight": 3}
    with handing_over("tiny", "pipelines.yaml", [], seen[0]):  # a flow that fails before it takes it
        pass
    assert checked("tiny", REPO / "pipelines.yaml", []).sample.n == 4  # forgotten; the same file however named
    assert calls == {"load": 4, "preflight": 4}
    forget()
