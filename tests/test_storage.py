"""fastmix_data.storage and fastmix_data.io: URLs, retries through a fault-injecting proxy, the
node-local cache (budget, pins, one download per node), atomic writes to paths and to S3."""

from __future__ import annotations

import multiprocessing
import os
import time

import pytest
from remote_servers import Faults, fault_proxy, http_server

from fastmix_data.errors import SourceError, UnsafeInputError
from fastmix_data.io import atomic_path, sha256_file, write_bytes_atomic, write_json_atomic
from fastmix_data.storage import (
    CacheBudgetError,
    RemoteError,
    RemoteFS,
    RetryPolicy,
    ShardCache,
    read_bytes,
    redact,
    stat,
)
from fastmix_data.storage.cache import entry_key, parse_size
from fastmix_data.storage.retry import call
from fastmix_data.storage.urls import check_no_credentials, common_dir, join, relative_name

FAST = RetryPolicy(tries=4, base_delay=0.01, max_delay=0.05)


# ---------------------------------------------------------------------------------------- urls
def test_redact_hides_userinfo_and_query_values():
    assert redact("s3://key:secret@bucket/a.tar") == "s3://***@bucket/a.tar"
    assert redact("https://h/x.tar?sig=abc&v=1") == "https://h/x.tar?sig=***&v=***"
    assert redact("/local/path") == "/local/path"


def test_credentials_in_url_refused():
    with pytest.raises(UnsafeInputError, match="storage_options"):
        check_no_credentials("gs://b/x?X-Goog-Signature=zzz")
    check_no_credentials("s3://bucket/prefix/a.parquet")  # plain URLs are data


def test_join_refuses_escapes_and_common_dir():
    assert join("s3://b/data", "sub/x.mds") == "s3://b/data/sub/x.mds"
    for bad in ("../x", "/etc/passwd", "s3://other/x"):
        with pytest.raises(UnsafeInputError):
            join("s3://b/data", bad)
    assert common_dir(["s3://b/d/a/1.tar", "s3://b/d/b/2.tar"]) == "s3://b/d"
    assert common_dir(["s3://b/d/1.tar", "s3://c/d/2.tar"]) == ""
    assert relative_name("s3://b/d/a/1.tar", "s3://b/d") == "a/1.tar"


def test_parse_size():
    assert parse_size("2MiB") == 2 << 20 and parse_size("1GB") == 10**9 and parse_size(5) == 5
    with pytest.raises(ValueError):
        parse_size("lots")


def test_prefetch_is_a_byte_size_capped_by_the_cache_budget(tmp_path):
    from fastmix_data.storage import Storage

    assert Storage(tmp_path, prefetch="64MB").prefetch == 64_000_000
    assert Storage(tmp_path, cache_limit=1000, prefetch="1GB").prefetch_bytes() == 250  # a quarter of the budget
    assert Storage(tmp_path, prefetch=0).prefetch_bytes() == 0
    with pytest.raises(ValueError, match="prefetch must be a byte size"):
        Storage(tmp_path, prefetch=-1)
    with pytest.raises(ValueError, match="prefetch=4: prefetch is a byte size"):
        Storage(tmp_path, prefetch=4)  # the old count of reads ahead is refused, not read as 4 bytes
    assert Storage(tmp_path, prefetch="1B").prefetch == 1  # with its unit it is a size: just the next read


# ---------------------------------------------------------------------------------------- retries
def test_jitter_stays_under_the_exponential_cap():
    policy = RetryPolicy(tries=6, base_delay=0.1, max_delay=0.5)
    for attempt in range(1, 8):
        cap = min(0.5, 0.1 * 2 ** (attempt - 1))
        assert all(0 <= policy.delay(attempt) <= cap for _ in range(50))


@pytest.fixture
def served(tmp_path):
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 40)
    with http_server(tmp_path) as url:
        yield url


def test_5xx_and_dropped_connections_are_retried(served):
    faults = Faults(fail_status=2, status=503, drop=1)
    with fault_proxy(served, faults) as url:
        data = RemoteFS(retry=FAST).read(url + "blob.bin")
    assert data == bytes(range(256)) * 40
    assert faults.failed == 2 and faults.dropped == 1


def test_last_try_names_url_status_and_what_to_do(served):
    faults = Faults(fail_status=100, status=503)
    with fault_proxy(served, faults) as url, pytest.raises(RemoteError) as info:
        RemoteFS(retry=FAST).read(url + "blob.bin")
    msg = str(info.value)
    assert "blob.bin" in msg and "HTTP 503" in msg and "4 tries" in msg and "retry later" in msg
    assert info.value.status == 503 and faults.failed == 4


def test_not_found_is_not_retried(served):
    faults = Faults()
    with fault_proxy(served, faults) as url, pytest.raises(RemoteError, match="1 try.*check the URL"):
        RemoteFS(retry=FAST).stat(url + "missing.bin")
    assert faults.requests <= 2  # one HEAD (fsspec may follow with one GET); never retried


def test_a_call_at_interpreter_exit_is_not_retried():
    """At exit asyncio can no longer resolve names; retrying only delays the exit (a DataLoader
    worker's prefetch threads held its shutdown for seconds)."""
    from fastmix_data.storage.retry import is_transient

    calls = []

    def at_exit():
        calls.append(1)
        try:
            raise RuntimeError("cannot schedule new futures after shutdown")
        except RuntimeError as exc:
            raise ConnectionError("An HTTP Client raised an unhandled exception") from exc

    assert is_transient(ConnectionError("reset")) and not is_transient(RuntimeError("cannot schedule new futures after shutdown"))
    with pytest.raises(RemoteError, match="1 try"):
        call(at_exit, "s3://b/k", "read", FAST)
    assert calls == [1]


# ---------------------------------------------------------------------------------------- cache
def _filler(payload: bytes, calls: list | None = None):
    def fill(path: str) -> None:
        if calls is not None:
            calls.append(path)
        with open(path, "wb") as f:
            f.write(payload)

    return fill


def test_cache_hit_miss_and_lru_eviction(tmp_path):
    cache = ShardCache(tmp_path, limit=250)
    calls: list = []
    for name in ("a", "b"):
        cache.get(name, 100, _filler(name.encode() * 100, calls)).close()
    os.utime(tmp_path / "blobs" / "a", ns=(1, 1))  # a is the least recently used
    with cache.get("b", 100, _filler(b"", calls)) as pin:  # hit: no fill
        assert pin.read() == b"b" * 100
    cache.get("c", 100, _filler(b"c" * 100, calls)).close()  # evicts a, keeps b
    assert len(calls) == 3 and cache.hits == 1
    assert sorted(os.listdir(tmp_path / "blobs")) == ["b", "c"] and cache.bytes_on_disk() == 200


def test_pinned_entries_are_never_evicted(tmp_path):
    cache = ShardCache(tmp_path, limit=250)
    pins = [cache.get(k, 100, _filler(b"x" * 100)) for k in ("a", "b")]
    with pytest.raises(CacheBudgetError, match="200 bytes are pinned"):
        cache.get("c", 100, _filler(b"c" * 100))
    assert sorted(os.listdir(tmp_path / "blobs")) == ["a", "b"]
    pins[0].close()
    cache.get("c", 100, _filler(b"c" * 100)).close()  # a is free now
    assert sorted(os.listdir(tmp_path / "blobs")) == ["b", "c"]
    pins[1].close()


def test_entry_larger_than_budget_is_a_clear_error(tmp_path):
    with pytest.raises(CacheBudgetError, match="raise cache_limit"):
        ShardCache(tmp_path, limit=10).get("k", 11, _filler(b"x" * 11))


def test_short_download_is_refused(tmp_path):
    with pytest.raises(SourceError, match="expected 10"):
        ShardCache(tmp_path, limit=100).get("k", 10, _filler(b"x" * 3))
    assert not os.listdir(tmp_path / "blobs")


def test_prefetch_leaves_an_entry_another_process_downloads(tmp_path):
    """``get_many(wait=False)`` (prefetch) fills what it can claim and returns None for an entry
    whose download claim another process holds, instead of blocking a prefetch thread on it."""
    import fcntl

    cache = ShardCache(tmp_path, limit=10**6)
    (tmp_path / "partial").mkdir()
    other = os.open(tmp_path / "partial" / "b.lock", os.O_RDWR | os.O_CREAT)  # "another process" claims b
    fcntl.flock(other, fcntl.LOCK_EX)  # flock is per open file: the cache's own open conflicts with it
    asked: list = []

    def fill(indices):
        asked.append(indices)
        return [b"x" * 10 for _ in indices]

    try:
        pins = cache.get_many([("a", 10), ("b", 10)], fill, wait=False)
        assert asked == [[0]] and pins[1] is None and pins[0].read() == b"x" * 10
        pins[0].close()
    finally:
        os.close(other)
    assert not cache.has("b") and cache.has("a")


def _get_in_process(directory: str, log: str, out: multiprocessing.Queue) -> None:
    def fill(path: str) -> None:
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.3)  # the others arrive while this download runs
        with open(path, "wb") as f:
            f.write(b"shard" * 1000)

    with ShardCache(directory, limit=10**6).get(entry_key("s3://b/x", 5000, "v1", None), 5000, fill) as pin:
        out.put(pin.read() == b"shard" * 1000)


def test_one_download_per_node_across_processes(tmp_path):
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    log = str(tmp_path / "downloads.log")
    procs = [ctx.Process(target=_get_in_process, args=(str(tmp_path / "c"), log, out)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [out.get(timeout=5) for _ in procs] == [True] * 4
    with open(log) as f:
        assert len(f.read().split()) == 1


# ---------------------------------------------------------------------------------------- io
def test_atomic_local_writes_leave_no_temporary_files(tmp_path):
    target = tmp_path / "sub" / "x.json"
    write_json_atomic(target, {"a": 1})
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "sub" / "y.bin") as tmp:
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise RuntimeError("writer crashed")
    assert sorted(os.listdir(tmp_path / "sub")) == ["x.json"]
    assert target.read_text() == '{\n "a": 1\n}\n'


def test_threads_share_one_filesystem_and_start_one_s3_client(s3, tmp_path, monkeypatch):
    """Concurrent first requests from several threads (a worker's prefetch threads) share one
    filesystem and start one S3 client between them: fsspec keys its instances on the thread too,
    and s3fs makes a new client whenever its client has no open HTTP session yet (0.1-0.5 s of CPU
    each in a fresh DataLoader worker). (The range GETs through s3fs here; obstore's below.)"""
    from concurrent.futures import ThreadPoolExecutor

    from fastmix_data.storage.fs import filesystem

    monkeypatch.setenv("FASTMIX_DATA_S3_CLIENT", "s3fs")

    payload = os.urandom(5000)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.bin").write_bytes(payload)
    url = s3.put(tmp_path / "d", "one-client") + "/x.bin"
    options = {"config_kwargs": {"connect_timeout": 7}}  # a filesystem of this test's own
    fs = filesystem(url, options)[0]
    made: list = []
    create = fs.session.create_client
    fs.session.create_client = lambda *a, **kw: (made.append(1), create(*a, **kw))[1]  # counts, then the real one
    remote = RemoteFS(options)
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda i: remote.read_ranges_identified(url, [(i * 100, 100)]), range(8)))
        seen = list(pool.map(lambda _: filesystem(url, options)[0], range(8)))
    assert [data for (data, _), in got] == [payload[i * 100 : (i + 1) * 100] for i in range(8)]
    assert all(f is fs for f in seen) and len(made) == 1


def test_atomic_write_and_hash_on_s3(s3, tmp_path):
    s3.put(_one_file(tmp_path), "seed")  # creates the bucket
    url = f"s3://{s3.bucket}/out/report.bin"
    write_bytes_atomic(url, b"payload" * 100)
    assert read_bytes(url) == b"payload" * 100
    assert stat(url).size == 700 and stat(url).version
    local = tmp_path / "copy.bin"
    local.write_bytes(b"payload" * 100)
    assert sha256_file(url) == sha256_file(local)


def _one_file(tmp_path):
    d = tmp_path / "seed"
    d.mkdir()
    (d / "x").write_bytes(b"x")
    return d


def test_joiner_matches_join_and_refuses_the_same():
    from fastmix_data.storage.urls import joiner

    one = joiner("s3://b/data")
    assert one("sub/x.mds") == join("s3://b/data", "sub/x.mds") == "s3://b/data/sub/x.mds"
    assert one("./x.mds") == join("s3://b/data", "./x.mds")
    for bad in ("../x", "/etc/passwd", "s3://other/x", "a/../../x"):
        with pytest.raises(UnsafeInputError):
            one(bad)


# ---------------------------------------------------------------------------------------- obstore
@pytest.fixture
def as_worker(monkeypatch):
    """This process reads as a DataLoader worker does (obstore is used only there: the main process
    may fork workers later, and obstore's runtime does not survive fork)."""
    from fastmix_data.storage import s3_get

    assert not s3_get.in_dataloader_worker()
    monkeypatch.setattr(s3_get, "in_dataloader_worker", lambda: True)


def _put_blob(s3, tmp_path, prefix: str) -> tuple[str, bytes]:
    payload = os.urandom(20_000)
    (tmp_path / prefix).mkdir()
    (tmp_path / prefix / "x.bin").write_bytes(payload)
    return s3.put(tmp_path / prefix, prefix) + "/x.bin", payload


def test_s3_range_gets_through_obstore_carry_the_objects_identity(s3, tmp_path, monkeypatch):
    """A DataLoader worker's range GETs go through obstore by default and answer as the s3fs path
    does: the bytes, the object's size and its ETag, as the index holds them (stat: a HEAD through
    s3fs). The main process's go through s3fs."""
    from fastmix_data.storage import s3_get
    from fastmix_data.storage.fs import _options

    url, payload = _put_blob(s3, tmp_path, "ob")
    assert s3_get.store_for(s3.bucket, _options("s3", {})) is None  # the main process
    monkeypatch.setattr(s3_get, "in_dataloader_worker", lambda: True)
    ranges = [(0, 100), (5000, 3000), (19_990, 10)]
    via_obstore = RemoteFS().read_ranges_identified(url, ranges)
    assert s3_get.store_for(s3.bucket, _options("s3", {})) is not None  # obstore did them
    monkeypatch.setenv("FASTMIX_DATA_S3_CLIENT", "s3fs")
    assert s3_get.store_for(s3.bucket, _options("s3", {})) is None
    via_s3fs = RemoteFS().read_ranges_identified(url, ranges)
    info = RemoteFS().stat(url)
    assert [d for d, _ in via_obstore] == [payload[o : o + n] for o, n in ranges] == [d for d, _ in via_s3fs]
    assert [i for _, i in via_obstore] == [i for _, i in via_s3fs] == [info] * 3
    assert info.size == 20_000 and info.version


def test_obstore_gets_are_retried_by_the_policy_and_fail_naming_the_url(s3, tmp_path, monkeypatch, as_worker):
    """obstore's own retries are off: retry.py retries 5xx and dropped connections, fails at once on
    404, and its last error names the URL, the status and the tries, never the credentials."""
    from remote_servers import FAKE_SECRET

    url, payload = _put_blob(s3, tmp_path, "retry")
    faults = Faults(fail_status=2, status=503, drop=1)
    with fault_proxy(s3.endpoint, faults) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy)  # a store of its own: the endpoint is part of its key
        (data, info), = RemoteFS(retry=FAST).read_ranges_identified(url, [(10, 90)])
        assert data == payload[10:100] and info.size == 20_000
        assert faults.failed == 2 and faults.dropped == 1 and faults.requests == 4
        faults.fail_status, faults.requests = 100, 0
        with pytest.raises(RemoteError) as info:
            RemoteFS(retry=FAST).read_ranges_identified(url, [(0, 10)])
        assert faults.requests == 4
        msg = str(info.value)
        assert url in msg and "HTTP 503" in msg and "4 tries" in msg and info.value.status == 503
        assert FAKE_SECRET not in msg and FAKE_SECRET not in repr(info.value.__cause__)
        faults.fail_status, faults.requests = 0, 0
        with pytest.raises(RemoteError, match="1 try.*check the URL"):
            RemoteFS(retry=FAST).read_ranges_identified(url.replace("x.bin", "gone.bin"), [(0, 10)])
        assert faults.requests == 1


def test_whole_object_downloads_through_obstore_are_checked_on_the_get_without_a_head(s3, tmp_path, monkeypatch,
                                                                                     as_worker):
    """A worker's whole-object download (WebDataset, MDS shards) through obstore: one GET, no HEAD,
    the identity the GET answered with equal to the index's (stat). An object changed since it was
    indexed is refused by name from the GET's headers, before its body is read (a grown object is
    not downloaded), and nothing of it is cached; outside obstore, s3fs's HEAD + GET."""
    from fastmix_data.storage import Expected, ShardChangedError, Storage

    url, payload = _put_blob(s3, tmp_path, "whole")
    info = RemoteFS().stat(url)
    faults = Faults()
    with fault_proxy(s3.endpoint, faults) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy)
        seen = []
        assert RemoteFS().download_identified(url, str(tmp_path / "copy"), seen.append)
        assert seen == [info] and (tmp_path / "copy").read_bytes() == payload
        storage = Storage(tmp_path / "cache")
        with storage.fetch(url, Expected(info.size, info.version), where="shard 'w/x.bin'") as pin:
            assert pin.read() == payload
        assert [line.split()[0] for line in faults.log] == ["GET", "GET"]  # no HEAD
        (tmp_path / "whole" / "x.bin").write_bytes(payload * 50)  # the object changes after indexing
        s3.put(tmp_path / "whole", "whole")
        stale = Storage(tmp_path / "cache2")
        with pytest.raises(ShardChangedError, match=r"shard 'w/x.bin' changed since it was indexed \(1000000 bytes"):
            stale.fetch(url, Expected(info.size, info.version), where="shard 'w/x.bin'")
        assert stale.cache.bytes_on_disk() == 0  # nothing of the changed object cached

        def refuse(now):
            raise ShardChangedError(f"{now.size} bytes")

        with pytest.raises(ShardChangedError, match="1000000 bytes"):  # on the headers: no body written
            RemoteFS().download_identified(url, str(tmp_path / "never"), refuse)
        assert not (tmp_path / "never").exists()
        assert not [n for n in os.listdir(tmp_path / "cache2" / "partial") if n.endswith(".tmp")]
        monkeypatch.setenv("FASTMIX_DATA_S3_CLIENT", "s3fs")  # the s3fs path: asks first
        assert not RemoteFS().download_identified(url, str(tmp_path / "copy2"), seen.append)
        assert not (tmp_path / "copy2").exists() and len(seen) == 1


def test_keys_obstore_cannot_name_are_read_through_s3fs_in_a_worker(s3, tmp_path, as_worker):
    """S3 allows keys with an empty or '.' segment; object_store refuses to name them, so a worker
    reads those through s3fs (ranges and whole objects), and the others through obstore."""
    from fastmix_data.storage import s3_get
    from fastmix_data.storage.fs import filesystem

    url, payload = _put_blob(s3, tmp_path, "odd")
    fs, _ = filesystem(url)
    odd = {f"s3://{s3.bucket}/odd//x.bin", f"s3://{s3.bucket}/odd/./x.bin"}
    for u in odd:
        fs.pipe(u[len("s3://"):], payload)
    assert not s3_get.usable_key("odd//x.bin") and not s3_get.usable_key("odd/./x.bin")
    assert s3_get.usable_key("odd/x.bin") and s3_get.usable_key("odd/a b+c%20ü.bin")
    for u in [url, *sorted(odd)]:
        (data, info), = RemoteFS().read_ranges_identified(u, [(5, 50)])
        assert data == payload[5:55] and info.size == len(payload)
        seen = []
        through_obstore = RemoteFS().download_identified(u, str(tmp_path / "copy"), seen.append)
        assert through_obstore == (u == url)
        if through_obstore:
            assert (tmp_path / "copy").read_bytes() == payload and seen[0].size == len(payload)


def test_obstore_is_used_only_for_what_it_honours_as_botocore_does(monkeypatch, as_worker):
    """Credentials from the options or the environment's keys, a known region or a custom endpoint,
    and no s3fs-only setting; anything else (a profile, the ~/.aws files, roles) reads through s3fs,
    or is an error naming why when obstore is asked for by name."""
    from fastmix_data.storage import s3_get
    from fastmix_data.storage.fs import _options

    env = {"AWS_ACCESS_KEY_ID": "AKIA1", "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "eu-west-1"}
    config, client = s3_get.s3_config(_options("s3", {}), env)
    assert config == {"access_key_id": "AKIA1", "secret_access_key": "s", "region": "eu-west-1",
                      "virtual_hosted_style_request": True}
    assert client["connect_timeout"].total_seconds() == 10 and client["read_timeout"].total_seconds() == 60
    assert client["timeout"] == s3_get.NO_OVERALL_LIMIT  # not obstore's 30 s per request: large shards
    config, client = s3_get.s3_config({"key": "k", "secret": "s", "token": "t",
                                       "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}, {})
    assert config == {"access_key_id": "k", "secret_access_key": "s", "session_token": "t",
                      "region": "us-east-1", "endpoint": "http://127.0.0.1:9"}
    assert client == {"allow_http": True, "timeout": s3_get.NO_OVERALL_LIMIT}
    assert s3_get.s3_config({"anon": True, "client_kwargs": {"region_name": "us-west-2"}}, {})[0] == {
        "skip_signature": True, "region": "us-west-2", "virtual_hosted_style_request": True}
    assert "profile" in s3_get.s3_config({}, {"AWS_PROFILE": "dev", "AWS_DEFAULT_REGION": "eu-west-1"})
    assert "profile" in s3_get.s3_config({"profile": "dev"}, env)
    assert "requester_pays" in s3_get.s3_config({"requester_pays": True}, env)
    assert "region" in s3_get.s3_config({}, {k: v for k, v in env.items() if k != "AWS_DEFAULT_REGION"})
    aws_endpoint = {"client_kwargs": {"endpoint_url": "https://s3.eu-west-1.amazonaws.com"}}
    no_region = {k: v for k, v in env.items() if k != "AWS_DEFAULT_REGION"}
    assert "AWS endpoint without a configured region" in s3_get.s3_config(aws_endpoint, no_region)
    assert s3_get.s3_config(aws_endpoint, env)[0]["region"] == "eu-west-1"
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    assert s3_get.store_for("b", {"profile": "dev"}) is None  # s3fs reads
    monkeypatch.setenv("FASTMIX_DATA_S3_CLIENT", "obstore")
    with pytest.raises(SourceError, match="obstore cannot read s3://b: storage_options 'profile'"):
        s3_get.store_for("b", {"profile": "dev"})
    monkeypatch.setenv("FASTMIX_DATA_S3_CLIENT", "boto")
    with pytest.raises(ValueError, match="FASTMIX_DATA_S3_CLIENT='boto'"):
        s3_get.store_for("b", {})


def _read_in_child(url: str, out) -> None:
    from fastmix_data.storage import s3_get
    from fastmix_data.storage.fs import _options

    bucket = url.split("/")[2]
    (data, _), = RemoteFS(retry=FAST).read_ranges_identified(url, [(0, 50)])
    out.put((data, s3_get.store_for(bucket, _options("s3", {})) is None, s3_get._unusable(_options("s3", {}))))


def test_a_process_forked_after_obstore_was_used_reads_through_s3fs(s3, tmp_path, as_worker):
    """obstore's runtime does not survive fork() (a forked child's request hangs): a DataLoader worker
    forked from a process that had obstore loaded reads through s3fs instead, and does not hang."""
    url, payload = _put_blob(s3, tmp_path, "fork")
    RemoteFS().read_ranges_identified(url, [(0, 10)])  # this process used obstore
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_read_in_child, args=(url, out))
    child.start()
    try:
        data, fell_back, why = out.get(timeout=30)
        assert data == payload[:50] and fell_back and "forked from" in why
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()
