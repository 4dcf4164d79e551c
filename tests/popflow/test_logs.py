"""Engine log levels: WARNING by default, INFO with --verbose, and an explicit VLLM_LOGGING_LEVEL wins."""

from __future__ import annotations

import logging
import os

import pytest

from popflow import logs


@pytest.fixture(autouse=True)
def restore_levels():
    """configure() sets logger levels and environment variables: every test here leaves both as it found them
    (monkeypatch.delenv of an absent variable records nothing, so the environment is restored whole)."""
    before = {name: logging.getLogger(name).level for name in logs.ENGINE_LOGGERS}
    environ = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(environ)
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


def test_third_party_notices_are_dropped_and_other_warnings_kept(monkeypatch):
    """Each of vLLM's (and lm-eval's IFEval) repeated notices is dropped by its own logger once popflow quiets
    them, unless --verbose; any other warning passes, and quieting twice adds one filter a logger."""
    monkeypatch.delenv("POPFLOW_VERBOSE", raising=False)
    loggers = {name: logging.getLogger(name) for name in logs.NOTICES}
    before = {name: list(lg.filters) for name, lg in loggers.items()}
    try:
        logs.quiet_notices()
        logs.quiet_notices()

        def passes(name, msg):
            return loggers[name].filter(logging.LogRecord(name, logging.WARNING, __file__, 1, msg, (), None))

        assert all(sum(isinstance(f, logs._DropNotice) for f in lg.filters) == 1 for lg in loggers.values())
        dropped = [  # as vLLM 0.32 words them (its logger.warning calls, arguments filled in)
            ("vllm.v1.worker.cpu_worker", "CPU backend doesn't allow to use `torch.set_num_threads` after the "
                                          "thread binding, skip it."),
            ("vllm.v1.worker.cpu_worker", "libtcmalloc is not found in LD_PRELOAD. For best performance, ..."),
            ("vllm.triton_utils.dispatcher", "Kernel vllm.v1.sample.x is already registered. Overwriting."),
            ("vllm.triton_utils.importing", "Triton is installed, but doesn't include CPU backend. Disabling Triton."),
            ("vllm.engine.arg_utils", "The global random seed is set to 0. Since VLLM_ENABLE_V1_MULTIPROCESSING "
                                      "is set to False, this may affect the random state"),
            ("vllm.config.vllm", "Enforce eager set, disabling torch.compile, CUDAGraphs, and JIT kernel warmup."),
            ("vllm.config.vllm", "Inductor compilation was disabled by user settings, optimizations settings ..."),
            ("vllm.config.vllm", "Model Runner V2 requires Triton; using the V1 model runner instead."),
            ("vllm.platforms.cpu", "Triton is not installed. triton-cpu is expected on x86 CPUs."),
            ("vllm.platforms.cpu", "Reset SSM cache type to float32 for accelerated GDN mamba backend 'none'."),
            ("vllm.platforms.interface", "Unknown vLLM environment variable detected: VLLM_DIST_IDENT"),
            ("lm_eval.tasks.ifeval.instructions", "Unable to detect language for text https://x.org due to No "
                                                  "features in text."),
        ]
        for name, msg in dropped:
            assert not passes(name, msg), msg
        assert passes("vllm.v1.worker.cpu_worker", "KV cache is too small: increase gpu_memory_utilization")
        assert passes("vllm.config.vllm", "max_model_len exceeds the model's context; set it lower")
        assert passes("vllm.platforms.interface", "Unknown vLLM environment variable detected: VLLM_CPU_KVCACHE")
        monkeypatch.setenv("POPFLOW_VERBOSE", "1")  # --verbose shows everything
        assert all(passes(name, msg) for name, msg in dropped)
    finally:
        for name, lg in loggers.items():
            lg.filters[:] = before[name]


def test_torch_cpp_warnings_are_quiet_unless_verbose(monkeypatch):
    """c10 reads TORCH_CPP_LOG_LEVEL when torch is imported; configure sets it (an explicit one wins)."""
    for var in ("POPFLOW_VERBOSE", "TORCH_CPP_LOG_LEVEL"):
        monkeypatch.delenv(var, raising=False)
    logs.configure()
    assert os.environ["TORCH_CPP_LOG_LEVEL"] == "ERROR"
    monkeypatch.delenv("TORCH_CPP_LOG_LEVEL")
    logs.configure(verbose_flag=True)
    assert os.environ["TORCH_CPP_LOG_LEVEL"] == "INFO"
    monkeypatch.setenv("TORCH_CPP_LOG_LEVEL", "WARNING")
    logs.configure()
    assert os.environ["TORCH_CPP_LOG_LEVEL"] == "WARNING"
