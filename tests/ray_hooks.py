"""Fault injection for the Ray tests, installed in every Ray worker by ``worker_process_setup_hook``.

A test writes ``<out_dir>.trap`` holding an output shard's name. The first attempt (over all
workers) to write that Parquet shard writes part of its temporary file, records its process id in
``<out_dir>.trap.pid`` and then blocks, so the test can kill that worker (or the driver) while the
shard is half-written. Later attempts write normally. Without a trap file nothing changes.
"""

from __future__ import annotations

import importlib
import os
import time
from pathlib import Path


def install() -> None:
    mod = importlib.import_module("fastmix_data.export.resample")  # the module (the package's name is the function)

    real = mod._write_parquet

    def trapped(path, chunks, names, columns):
        out_dir = Path(path).parents[2]  # <out_dir>/.fastmix-resample/tmp/<name>.<host>.<pid>.tmp
        trap = Path(f"{out_dir}.trap")
        if trap.is_file() and Path(path).name.startswith(trap.read_text().strip() + "."):
            try:
                os.mkdir(f"{trap}.taken")  # atomic: only the first attempt blocks
            except FileExistsError:
                return real(path, chunks, names, columns)
            next(iter(chunks))
            Path(path).write_bytes(b"PAR1 half a shard")
            Path(f"{trap}.pid.tmp").write_text(str(os.getpid()))
            os.replace(f"{trap}.pid.tmp", f"{trap}.pid")
            while True:  # until the test kills this process
                time.sleep(0.2)
        return real(path, chunks, names, columns)

    mod._write_parquet = trapped
