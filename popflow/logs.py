"""How loud popflow and its engines are.

By default the engines (vLLM, transformers) log at WARNING and vLLM's own progress bar is off (it counts
finished requests, and on CPU a shard's requests all finish together, so it sits at 0% and then jumps);
popflow logs its own progress per shard instead. `popflow run --verbose` (or POPFLOW_VERBOSE=1, which
deployments and engine subprocesses inherit) turns both back on.
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


# vLLM notices about its own workings, repeated on every in-process engine start, that no user can act on:
# {logger: text of the message}. The worker's "doesn't allow to use torch.set_num_threads after the thread
# binding" comes each time something asks for threads; the dispatcher's "Kernel ... is already registered.
# Overwriting." once per kernel when a second engine starts in one process (sample, then evaluate).
VLLM_NOTICES = {"vllm.v1.worker.cpu_worker": "torch.set_num_threads` after the thread binding",
                "vllm.triton_utils.dispatcher": "is already registered. Overwriting."}


class _DropNotice(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_vllm_notices() -> None:
    """Drop VLLM_NOTICES where they are logged (a filter on each one's logger; idempotent)."""
    for name, text in VLLM_NOTICES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotice) for f in logger.filters):
            logger.addFilter(_DropNotice(text))


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
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", level.lower())
    for name in ENGINE_LOGGERS:
        logging.getLogger(name).setLevel(level)
