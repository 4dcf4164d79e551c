"""Prefect's temporary API server as popflow starts it: in a session of its own, and gone when popflow is.

Without PREFECT_API_URL, `popflow run`, `loop` and `experiment` get Prefect's temporary server, a uvicorn child
process. Prefect starts it in popflow's process group, so a terminal's Ctrl-C, which signals the whole
foreground group, stopped the server together with popflow: the interrupted run could not be recorded, and
popflow retried the dead API for about a minute before it failed with a ConnectError instead of saying it was
interrupted. `detach()` has Prefect start the server in its own session, so Ctrl-C reaches popflow alone,
which records the interruption and stops the server as it exits (Prefect's atexit); and the server, started
through this module, watches its parent and exits when popflow has gone however it ended (SIGKILL too).

    from popflow import tempserver
    tempserver.detach()      # before the first flow runs (popflow/cli.py does)
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time

PARENT = "POPFLOW_TEMPSERVER_PARENT"  # the pid the server watches, set before it starts (it may outlive it)


class DetachedPopen(subprocess.Popen):
    """Popen for Prefect's `[python, -m, uvicorn, ...]`: this module in place of uvicorn, in a new session.
    Another command (a Prefect release that starts its server otherwise) runs as Prefect wrote it, with a
    warning: detached without the watchdog it could outlive popflow."""

    def __init__(self, args, **kwargs):
        args = list(args)
        if "uvicorn" not in args:
            logging.getLogger(__name__).warning(
                "Prefect's temporary server command has no uvicorn (%s): started in popflow's process group, so "
                "Ctrl-C also stops it (popflow/tempserver.py)", " ".join(map(str, args[:4])))
            super().__init__(args, **kwargs)
            return
        at = args.index("uvicorn")
        env = {**(kwargs.pop("env", None) or os.environ), PARENT: str(os.getpid())}
        super().__init__([*args[:at], __name__, *args[at + 1:]], start_new_session=True, env=env, **kwargs)


class _Subprocess:
    """The subprocess module as prefect/server/api/server.py sees it, with its Popen detached."""

    Popen = DetachedPopen

    def __getattr__(self, name: str):
        return getattr(subprocess, name)


def detach() -> None:
    """From now on, Prefect's temporary server starts detached (see the module docstring); idempotent."""
    from prefect.server.api import server

    server.subprocess = _Subprocess()


def watch_parent(poll_seconds: float = 0.5, grace_seconds: float = 10.0) -> None:
    """In the server: a daemon thread that stops this process (SIGTERM: uvicorn's clean shutdown, then a hard
    exit after `grace_seconds`) once its parent is no longer the popflow process that started it (the pid in
    POPFLOW_TEMPSERVER_PARENT: a popflow killed while this one started up is noticed too)."""
    parent = int(os.environ.get(PARENT) or os.getppid())

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_seconds)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_seconds)
        os._exit(0)

    threading.Thread(target=watch, name="popflow-parent-watch", daemon=True).start()


def main() -> None:
    """`python -m popflow.tempserver <uvicorn arguments>`: uvicorn, watching its parent."""
    from uvicorn.main import main as uvicorn

    watch_parent()
    sys.argv = ["uvicorn", *sys.argv[1:]]
    uvicorn()


if __name__ == "__main__":
    main()
