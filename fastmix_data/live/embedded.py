"""The search inside the training job: a child process of one rank, publishing like a sidecar.

Sidecar or embedded is one choice of who starts ``fastmix-data search ... --publish URI``: an
operator beside the job (sidecar), or rank ``on_rank`` of the job itself (embedded, on that rank's
machine and device: pass ``--device cuda:N`` among the search arguments). Either way the search
publishes and every rank follows the same URI, so the streams cannot tell the difference. With a
``tcp://…:0`` URI the rank that starts the search hands the actual URI to the others through the
job's store.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from fastmix_data.errors import PublishError
from fastmix_data.live.publisher import STATE_FILE
from fastmix_data.stream.distributed import rank_and_world, require_store

URI_KEY = "embedded_search/{name}/uri"


class EmbeddedSearch:
    """A search started by one rank of the job (see the module docstring); ``uri`` is the same on
    every rank. Use `start`."""

    def __init__(self, uri: str, process: subprocess.Popen | None):
        self.uri, self.process = uri, process

    @classmethod
    def start(cls, search_args: list[str], out_dir: str | os.PathLike, *, publish: str = "tcp://127.0.0.1:0",
              on_rank: int = 0, log_path: str | os.PathLike | None = None, timeout_s: float = 300.0,
              name: str = "search") -> EmbeddedSearch:
        """Start ``fastmix-data search <search_args> --out <out_dir> --publish <publish> --resume`` on
        rank ``on_rank`` and return, on every rank, once it publishes (a collective; ``name`` tells
        several embedded searches of one job apart).

        Raises:
            PublishError: the search exited or did not start publishing within ``timeout_s``.
        """
        rank, world = rank_and_world()
        store = require_store(rank, world, "sharing the embedded search's URI") if world > 1 else None
        key = URI_KEY.format(name=name)
        if rank != on_rank:
            store.wait([key])
            return cls(store.get(key).decode(), None)
        state = Path(out_dir) / STATE_FILE
        before = state.stat().st_mtime_ns if state.exists() else -1
        argv = [sys.executable, "-m", "fastmix_data.cli", "search", *search_args, "--out", str(out_dir),
                "--publish", publish, "--resume"]
        log = open(log_path, "ab") if log_path is not None else subprocess.DEVNULL  # noqa: SIM115
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        uri = _wait_for_uri(state, before, process, timeout_s)
        if store is not None:
            store.set(key, uri)
        return cls(uri, process)

    def running(self) -> bool:
        """True while this rank's search process runs (False on the other ranks)."""
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout_s: float = 30.0) -> None:
        """Terminate the search (it keeps its checkpoint; a later start resumes it)."""
        if self.running():
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()


def _wait_for_uri(state: Path, before: int, process: subprocess.Popen, timeout_s: float) -> str:
    import json

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if state.exists() and state.stat().st_mtime_ns != before:
            return json.loads(state.read_text())["uri"]
        if process.poll() is not None:
            raise PublishError(f"the embedded search exited with code {process.returncode} before publishing "
                               f"(arguments: {process.args})")
        time.sleep(0.1)
    process.kill()
    raise PublishError(f"the embedded search did not publish within {timeout_s:.0f} s (no fresh {state})")
