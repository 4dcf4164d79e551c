"""Engine log levels: WARNING by default, INFO with --verbose, and an explicit VLLM_LOGGING_LEVEL wins."""

from __future__ import annotations

import logging
import os

import pytest

from popflow import logs


@pytest.fixture(autouse=True)
def restore_levels():
    before = {name: logging.getLogger(name).level for name in logs.ENGINE_LOGGERS}
    yield
    for name, level in before.items():
        logging.getLogger(name).setLevel(level)


def test_quiet_by_default_loud_with_verbose(monkeypatch):
    for var in ("POPFLOW_VERBOSE", "VLLM_LOGGING_LEVEL", "TRANSFORMERS_VERBOSITY"):
        monkeypatch.delenv(var, raising=False)
    logs.configure()
    assert not logs.verbose()
    assert os.environ["VLLM_LOGGING_LEVEL"] == "WARNING"
    assert logging.getLogger("vllm").level == logging.WARNING
    monkeypatch.delenv("VLLM_LOGGING_LEVEL")
    logs.configure(verbose_flag=True)
    assert logs.verbose() and os.environ["VLLM_LOGGING_LEVEL"] == "INFO"
    assert logging.getLogger("transformers").level == logging.INFO


def test_an_explicit_engine_level_is_kept(monkeypatch):
    monkeypatch.delenv("POPFLOW_VERBOSE", raising=False)
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "DEBUG")
    logs.configure()
    assert os.environ["VLLM_LOGGING_LEVEL"] == "DEBUG"


def test_an_unexpected_error_is_one_line_with_its_root_cause_and_a_traceback_file(monkeypatch, tmp_path):
    """A replica's error as Ray wraps it (several lines, popflow's root cause inside): the CLI's line names the
    type and that cause and where the traceback went; the console handler drops tracebacks unless --verbose,
    while other handlers (Prefect's API handler: the UI) keep them."""
    import io
    import sys

    from popflow.cli import unexpected

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    try:
        raise RuntimeError("The actor died because of an error raised in its creation task\n"
                           "RuntimeError: Engine core initialization failed; root cause: ValueError: no memory "
                           "(full log: /tmp/ray/worker-1.err on host)\nmore context from Ray")
    except RuntimeError as exc:
        line = unexpected(exc)
    assert line.startswith("popflow: error: unexpected RuntimeError: root cause: ValueError: no memory (full log: "
                           "/tmp/ray/worker-1.err on host) (full traceback: ")
    written = next(tmp_path.glob("popflow-error-*.txt")).read_text()
    assert written.startswith("Traceback") and "more context from Ray" in written
    try:  # no replica's cause in the message: the innermost exception is the root cause
        try:
            open(tmp_path / "missing")
        except FileNotFoundError as inner:
            raise RuntimeError("engine failed to load\nsee above") from inner
    except RuntimeError as exc:
        assert "unexpected RuntimeError: root cause: FileNotFoundError: [Errno 2] No such file" in unexpected(exc)
    try:  # raised `from None`: what it replaced stays hidden
        try:
            raise KeyError("actor died")
        except KeyError:
            raise ValueError("item 'shard-3' killed 2 replicas") from None
    except ValueError as exc:
        assert "unexpected ValueError: item 'shard-3' killed 2 replicas (full traceback" in unexpected(exc)

    monkeypatch.delenv("POPFLOW_VERBOSE", raising=False)
    console, api = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", console)
    root, logger = logging.getLogger(), logging.getLogger("popflow.test.task_runs")
    console_handler, api_handler = logging.StreamHandler(sys.stderr), logging.Handler()
    api_handler.emit = lambda record: api.write(logging.Formatter().format(record))
    logger.addHandler(api_handler)
    root.addHandler(console_handler)
    try:
        logs.quiet_console_tracebacks()
        try:
            raise KeyError("boom")
        except KeyError:
            logger.error("Task run failed", exc_info=sys.exc_info())
    finally:
        root.removeHandler(console_handler)
        logger.removeHandler(api_handler)
    assert console.getvalue() == "Task run failed\n" and "Traceback" in api.getvalue()
    record = logging.LogRecord("x", logging.ERROR, "f", 1, "m", None, (KeyError, KeyError("k"), None))
    assert console_handler.format(record) == "m"
    monkeypatch.setenv("POPFLOW_VERBOSE", "1")  # --verbose: the console shows it too
    assert console_handler.format(record) == "m\nKeyError: 'k'"


def test_vllm_notices_are_dropped_and_other_warnings_kept():
    """Each of vLLM's repeated notices is dropped by its own logger once popflow quiets them; any other warning
    passes, and quieting twice adds one filter a logger."""
    loggers = {name: logging.getLogger(name) for name in logs.VLLM_NOTICES}
    before = {name: list(lg.filters) for name, lg in loggers.items()}
    try:
        logs.quiet_vllm_notices()
        logs.quiet_vllm_notices()

        def record(name, msg):
            return logging.LogRecord(name, logging.WARNING, __file__, 1, msg, (), None)

        worker, dispatcher = loggers["vllm.v1.worker.cpu_worker"], loggers["vllm.triton_utils.dispatcher"]
        assert len(worker.filters) == len(before["vllm.v1.worker.cpu_worker"]) + 1
        assert not worker.filter(record(worker.name, "CPU backend doesn't allow to use `torch.set_num_threads` "
                                                     "after the thread binding, skip it."))
        assert not dispatcher.filter(record(dispatcher.name, "Kernel vllm.v1.sample.x is already registered. "
                                                             "Overwriting."))
        assert worker.filter(record(worker.name, "libtcmalloc is not found in LD_PRELOAD."))
    finally:
        for name, lg in loggers.items():
            lg.filters[:] = before[name]
