"""The Ray engine on a real local cluster: same bytes as the local engine, retries, resume.

The cluster is started inside the tests: ``ray.init(num_cpus=2)`` plus a second node joined with
``ray start`` (3 CPUs on 2 nodes). Workers install tests/ray_hooks.py, which can block one shard's
first write attempt so that a test kills that worker, or the driver, while the shard is half-written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from shardgen import code_web_manifest, write_code_web

from fastmix_data.engine import RayEngine
from fastmix_data.export import build_manifest, write_manifest
from fastmix_data.export.resample import STATE_DIR, resample

if not os.environ.get("CI"):  # CI installs the [ray] extra: there a missing Ray fails these tests
    pytest.importorskip("ray")
import ray  # noqa: E402

TESTS = os.path.dirname(os.path.abspath(__file__))
DEADLINE = 180.0  # seconds: only an upper bound for a wait that should end much sooner


def _wait_for(what: str, check, proc: subprocess.Popen | None = None):
    end = time.monotonic() + DEADLINE
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(
                f"process {proc.args[:3]} exited ({proc.returncode}) while waiting for {what}"
            )
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def cluster(moto_endpoint):
    """A local Ray cluster (2 CPUs) with a second node (1 CPU) joined on loopback by ``ray start``;
    its workers reach the loopback S3 server (they inherit the environment set here)."""
    from remote_servers import s3_env

    s3 = s3_env(moto_endpoint)
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "RAY_AUTH_MODE", "RAY_memory_monitor_refresh_ms", *s3)}
    os.environ.update(s3)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (TESTS, saved["PYTHONPATH"]) if p)  # ray_hooks
    os.environ["RAY_AUTH_MODE"] = "disabled"  # a short-lived test cluster; no token file in $HOME
    # other jobs on a shared machine can fill its memory: Ray's monitor would kill our tasks for it
    os.environ["RAY_memory_monitor_refresh_ms"] = "0"
    temp_dir = tempfile.mkdtemp(prefix="fmray")  # short: Ray puts Unix sockets under it
    log = open(os.path.join(temp_dir, "node.log"), "w")
    node = None
    try:
        ray.init(
            address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=temp_dir,
            runtime_env={"worker_process_setup_hook": "ray_hooks.install"},
        )  # fmt: skip
        gcs = ray.get_runtime_context().gcs_address
        ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
        node = subprocess.Popen(
            [ray_bin, "start", "--block", f"--address={gcs}", "--num-cpus=1", "--node-ip-address=127.0.0.1",
             f"--temp-dir={temp_dir}", "--disable-usage-stats"],  # its address file goes there, not /tmp/ray
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        _wait_for("the second node", lambda: sum(n["Alive"] for n in ray.nodes()) == 2, node)
        yield gcs
    finally:
        ray.shutdown()
        if node is not None:
            os.killpg(node.pid, signal.SIGKILL)  # its own session: only the processes it started
            node.wait()
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_code_web(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def manifest(corpus):
    return code_web_manifest(corpus)


def _digests(out: Path) -> dict[str, str]:
    return {
        f: hashlib.sha256((out / f).read_bytes()).hexdigest()
        for f in sorted(os.listdir(out))
        if not f.startswith(".")
    }


@pytest.mark.parametrize("fmt", ["parquet", "webdataset", "mds"])
def test_same_bytes_as_local_for_any_number_of_ray_workers(cluster, manifest, tmp_path, fmt):
    local = resample(manifest, tmp_path / "local", format=fmt, shard_items=100, progress=False)
    assert local["stats"]["engine"] == "local"
    for workers in (1, None) if fmt == "parquet" else (None,):  # one task at a time; all 3 CPUs, 2 nodes
        out = tmp_path / f"ray-{workers}"
        index = resample(
            manifest, out, format=fmt, shard_items=100, progress=False, engine=RayEngine(cluster, workers)
        )
        assert index["complete"] and index["stats"]["engine"] == "ray"
        assert index["stats"]["workers"] == (workers or 3) and index["stats"]["tasks"] == 6
        assert _digests(out) == _digests(tmp_path / "local")  # shards, index.json, manifest.json
        assert not list((out / STATE_DIR / "tmp").glob("*")) if (out / STATE_DIR / "tmp").exists() else True


def test_manifest_same_bytes_when_indexed_by_ray_tasks(cluster, corpus, tmp_path):
    sources = {"code": str(corpus / "code"), "web": str(corpus / "web")}
    for i, engine in enumerate(("local", RayEngine(cluster))):  # empty index caches: every shard indexed
        m = build_manifest(sources, {"code": 1, "web": 1}, "2k_samples", root=corpus, engine=engine,
                           cache_dir=tmp_path / f"cache-{i}")  # fmt: skip
        write_manifest(m, tmp_path / f"manifest-{i}.json")
    assert (tmp_path / "manifest-0.json").read_bytes() == (tmp_path / "manifest-1.json").read_bytes()


def test_index_tasks_run_on_ray(cluster, corpus, tmp_path, caplog):
    from fastmix_data.sources import open_source

    with caplog.at_level(logging.INFO, logger="fastmix_data.sources.index"):
        src = open_source("code", corpus / "code", cache_dir=tmp_path, engine=RayEngine(cluster))
    assert src.rows == 150
    assert any("3 tasks (0 already done) on ray" in r.getMessage() for r in caplog.records)


def test_a_killed_worker_is_retried_and_leaves_nothing_partial(cluster, manifest, tmp_path):
    local = tmp_path / "local"
    resample(manifest, local, shard_items=100, progress=False)
    out = tmp_path / "out"
    trap = Path(f"{out}.trap")
    trap.write_text("part-00002.parquet")
    seen: dict = {}

    def kill_the_blocked_worker() -> None:
        pid = int(
            _wait_for(
                "the blocked worker",
                lambda: Path(f"{trap}.pid").is_file() and Path(f"{trap}.pid").read_text(),
            )
        )
        seen["tmp"] = sorted(p.name for p in (out / STATE_DIR / "tmp").iterdir())
        seen["visible"] = sorted(p.name for p in out.glob("*.parquet"))
        os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_the_blocked_worker)
    killer.start()
    index = resample(manifest, out, shard_items=100, progress=False, engine=RayEngine(cluster))
    killer.join()
    assert any(n.startswith("part-00002.parquet.") for n in seen["tmp"])  # it was half-written...
    assert "part-00002.parquet" not in seen["visible"]  # ...and not visible
    assert (
        index["complete"] and index["stats"]["retried_tasks"] == {"2": 1} and index["stats"]["retries"] == 1
    )
    assert _digests(out) == _digests(local)
    assert not (out / STATE_DIR / "tmp").exists()  # the dead attempt's temporary file was removed


def test_a_killed_driver_rerun_resumes_with_identical_output(cluster, manifest, tmp_path):
    local = tmp_path / "local"
    resample(manifest, local, shard_items=100, progress=False)
    write_manifest(manifest, tmp_path / "m.json")
    out = tmp_path / "out"
    Path(f"{out}.trap").write_text("part-00003.parquet")
    command = [sys.executable, os.path.join(TESTS, "ray_driver.py"), cluster, "resample", "--manifest",
               str(tmp_path / "m.json"), "--out", str(out), "--shard-items", "100", "--engine", "ray"]  # fmt: skip
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    others = [f"part-{i:05d}.parquet" for i in range(6) if i != 3]
    done = out / STATE_DIR / "done"
    _wait_for("the other shards", lambda: all((done / f"{n}.json").is_file() for n in others), driver)
    _wait_for("the blocked shard", lambda: Path(f"{out}.trap.pid").is_file(), driver)
    driver.kill()  # the driver dies while shard 3 is half-written
    driver.wait()
    assert not (out / "part-00003.parquet").exists() and not (out / "index.json").exists()
    mtimes = {n: os.stat(out / n).st_mtime_ns for n in others}
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=DEADLINE)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "6 tasks (5 already done) on ray" in rerun.stderr
    assert {n: os.stat(out / n).st_mtime_ns for n in others} == mtimes  # finished shards were skipped
    assert _digests(out) == _digests(local)
    assert json.loads((out / "index.json").read_text())["items"] == 600


def test_a_task_error_ends_the_run_with_its_own_exception(cluster):
    from test_engine import JOB  # tests/ is on the workers' PYTHONPATH (the fixture)

    from fastmix_data.errors import FastMixDataError

    values, stats = RayEngine(cluster).run(JOB, [1, 2, 3], progress=False)
    assert [v[0] for v in values] == [3, 6, 9] and stats.engine == "ray" and stats.total_retries == 0
    with pytest.raises(FastMixDataError, match="bad key -1"):
        RayEngine(cluster, max_retries=3).run(JOB, [1, -1, 2], progress=False)


def test_resample_to_s3_on_ray_same_bytes(cluster, manifest, tmp_path):
    from remote_servers import upload_dir

    from fastmix_data.storage import list_objects, read_bytes

    bucket = "ray-" + hashlib.sha256(str(tmp_path).encode()).hexdigest()[:16]
    upload_dir(os.environ["AWS_ENDPOINT_URL"], tmp_path, bucket, "empty")  # creates the bucket
    url = f"s3://{bucket}/mix"
    resample(manifest, tmp_path / "local", format="webdataset", shard_items=100, progress=False)
    index = resample(manifest, url, format="webdataset", shard_items=100, progress=False, engine=RayEngine(cluster))
    assert index["complete"] and index["stats"]["engine"] == "ray" and index["stats"]["tasks"] == 6
    visible = {o.url.rsplit("/", 1)[1]: o.url for o in list_objects(url + "/") if "/." not in o.url}
    assert {n: hashlib.sha256(read_bytes(u)).hexdigest() for n, u in visible.items()} == _digests(tmp_path / "local")


def test_index_command_on_ray(cluster, corpus, tmp_path):
    command = [sys.executable, os.path.join(TESTS, "ray_driver.py"), cluster, "index", str(corpus / "code"),
               "--out", str(tmp_path / "code.index.json"), "--cache-dir", str(tmp_path / "cache"), "--engine", "ray"]  # fmt: skip
    ray_run = subprocess.run(command, capture_output=True, text=True, timeout=DEADLINE)
    assert ray_run.returncode == 0, ray_run.stderr[-3000:]
    local = subprocess.run(
        [sys.executable, "-m", "fastmix_data.cli", "index", str(corpus / "code"), "--out", str(tmp_path / "local.json"),
         "--cache-dir", str(tmp_path / "cache-local")],
        capture_output=True, text=True, timeout=DEADLINE,
    )  # fmt: skip
    assert local.returncode == 0, local.stderr[-3000:]
    assert "3 shards" in ray_run.stdout
    assert (tmp_path / "code.index.json").read_bytes() == (tmp_path / "local.json").read_bytes()
