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
