"""A stream that follows published weights: `Follow` (its settings) and `Follower` (the runtime).

The follower lives in the training process of every rank, beside the `MixtureStream` made with
``follow=``. Two daemon threads, nothing for the training loop to call:

* *grants* (every rank): keeps the rank's weight channel supplied with batches it may serve, asking
  the job's ledger (:mod:`fastmix_data.live.ledger`) for more when fewer than ``lookahead / 2``
  are left or a worker waits, and installs the changes the ledger returns with the grant;
* *poll* (the deciding rank, rank 0 by default): every ``poll_s`` reads the publisher's heartbeat
  and, when it names a new update, the update; checks it, and records an accepted one in the ledger,
  which places it at the first batch no process of the job may have started.

Rejected (logged with the reason, counted): documents that are not the wire format, a wrong
signature or run id, weights that name unknown sources, miss one, are NaN, negative or all zero,
or are in other units than the stream's. Ignored (counted): duplicates (the same seq again, other
bytes), stale updates (older than the applied one) and out-of-order ones (older than one already
seen). A publisher whose heartbeat stops for ``dead_after_s`` is reported lost (a warning, and
``stats()["follow"]["publisher"] == "lost"``); the stream keeps its last weights and keeps polling.
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import logging
import threading
import time
from typing import Any

from fastmix_data.errors import CoordinationError, PublishError, WeightsError
from fastmix_data.live import wire
from fastmix_data.live.ledger import LocalLedger, StoreLedger
from fastmix_data.live.transport import TransportUnavailable, open_transport, token_from_env
from fastmix_data.plan.weights import normalize_weights

log = logging.getLogger(__name__)

GRANT_TICK_S = 0.002  # how often the grants thread looks at the rank's progress (an mmap read)
IDLE_TICK_S = 0.02  # ... before the stream is first iterated


@dataclasses.dataclass
class Follow:
    """How a `MixtureStream` follows published weights (``MixtureStream(..., follow=Follow(uri))``;
    a plain URI string means the defaults).

    Attributes:
        uri: where the publisher writes: ``tcp://HOST:PORT`` or a directory / fsspec URL.
        run_id: accept only updates of this search run (None: the first run seen, then only it).
        token: shared secret for signed updates (default: ``$FASTMIX_DATA_TOKEN``; needed for a
            non-loopback TCP address).
        poll_s: seconds between two reads of the publisher (deciding rank only). Default 0.2.
        lookahead: batches granted past the one asked for. A change applies at most
            ``lookahead + 1`` batches after the last batch any rank's training loop had received
            (with `MixtureStream.loader` or ``num_workers=0``; docs/live.md). Default 4.
        dead_after_s: heartbeat silence after which the publisher is reported lost. Default 10.
        decider_rank: the rank that reads the publisher and decides. Default 0.
    """

    uri: str
    run_id: str | None = None
    token: str | None = None
    poll_s: float = 0.2
    lookahead: int = 4
    dead_after_s: float = 10.0
    decider_rank: int = 0

    @classmethod
    def of(cls, follow: Follow | str) -> Follow:
        cfg = cls(follow) if isinstance(follow, str) else follow
        if not isinstance(cfg, Follow):
            raise PublishError(f"follow= takes a URI or a fastmix_data.live.Follow, got {follow!r}")
        return cfg.validate()

    def validate(self) -> Follow:
        if not isinstance(self.uri, str) or not self.uri:
            raise PublishError(f"follow: uri must be a non-empty string, got {self.uri!r}")
        if not (isinstance(self.lookahead, int) and self.lookahead >= 1):
            raise PublishError(f"follow: lookahead must be an integer >= 1, got {self.lookahead!r}")
        for name in ("poll_s", "dead_after_s"):
            if not (isinstance(getattr(self, name), (int, float)) and getattr(self, name) > 0):
                raise PublishError(f"follow: {name} must be > 0, got {getattr(self, name)!r}")
        return self


def _publisher_of(history: list) -> dict | None:
    """The ``publisher`` record of the last followed change in ``history`` (None: none)."""
    for entry in reversed(history):
        if entry.get("publisher"):
            return entry["publisher"]
    return None


class Follower:
    """The following runtime of one stream in its training process (see the module docstring)."""

    def __init__(self, stream: Any, cfg: Follow):
        self.stream, self.cfg = stream, cfg
        self.decider = stream.rank == cfg.decider_rank
        self.token = token_from_env(cfg.token)
        self.transport = open_transport(cfg.uri, serve=False, token=self.token) if self.decider else None
        self.ledger = self._make_ledger()
        self.counts = dict.fromkeys(("applied", "duplicates", "stale", "out_of_order", "rejected", "unreachable"), 0)
        self.last_rejection: str | None = None
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._start_state(stream.history)
        stream.channel.refill = self.refill
        self._threads = [threading.Thread(target=self._grants_loop, name="fastmix-grants", daemon=True)]
        if self.decider:
            self._threads.append(threading.Thread(target=self._poll_loop, name="fastmix-follow", daemon=True))
        for t in self._threads:
            t.start()
        atexit.register(self.close)  # before the channel's own exit handler removes its files

    def _make_ledger(self):
        if self.stream.world_size == 1:
            return LocalLedger(self.cfg.lookahead)
        from fastmix_data.stream.distributed import require_store

        store = require_store(self.stream.rank, self.stream.world_size, "following published weights")
        return StoreLedger(store, f"{self.stream._coordinator.namespace}/follow", self.stream.world_size,
                           self.cfg.lookahead)

    def _start_state(self, history: list) -> None:
        """Counters and positions as of ``history`` (construction, and `reset` after a resume)."""
        self.run_id = self.cfg.run_id
        self.applied_seq = self.seen_seq = 0
        self._last_read: tuple[int, str | None] | None = None
        self._pending: tuple[dict, Any] | None = None  # accepted, waiting for the job to join
        self._joined = False
        self._installed = len(history)
        self._beat: tuple | None = None
        self._beat_at = time.monotonic()
        self.publisher = "unseen"
        self._adopt(history)

    def _adopt(self, history: list) -> None:
        """Take the run and the applied seq from ``history``'s last followed change: a resumed or
        restored history (also one restored inside DataLoader workers) or another rank's decision."""
        last = _publisher_of(history)
        if last is None or (last["run_id"] == self.run_id and last["seq"] <= self.applied_seq):
            return
        self.run_id = self.cfg.run_id or last["run_id"]
        self.applied_seq = last["seq"]
        self.seen_seq = max(self.seen_seq, last["seq"])
        if self._last_read is None or self._last_read[0] < last["seq"]:
            self._last_read = (last["seq"], None)

    # ------------------------------------------------------------------------- grants
    def refill(self, batch: int | None = None) -> None:
        """Ask the ledger for more batches when the rank is short of them: fewer than ``lookahead / 2``
        left past the first batch its loop has not received (or a claiming worker's claims), or
        ``batch``, which the training process waits to serve (`WeightChannel.gate`)."""
        with self._lock:
            channel = self.stream.channel
            claimed, wanted, grant = channel.progress()
            need = max(claimed + 1, self.stream._next_batch, wanted, -1 if batch is None else batch)
            if not self._joined:
                if wanted < 0 and batch is None:
                    return  # nothing iterates yet (a later load_state_dict may still change the history)
                _, history = channel._read_history()  # restored in workers, perhaps
                self._adopt(history)
                self.ledger.join(history, max(self.stream._next_batch, 0), self.stream.fingerprint())
                self._joined = True
            if grant - need > self.cfg.lookahead // 2 or not self.ledger.ready():
                return
            self._install(*self.ledger.extend(need))

    def _install(self, grant: int, history: list) -> None:
        changed = len(history) != self._installed
        self.stream.channel.install(history if changed else None, grant)
        if changed:
            self._adopt(history)
            for entry in history[self._installed:]:
                log.info("rank %d: weights v%d %s apply from global batch %d", self.stream.rank, entry["version"],
                         entry["requested"], entry["batch"])
            self._installed = len(history)

    def _grants_loop(self) -> None:
        while not self._stop.wait(GRANT_TICK_S if self._joined else IDLE_TICK_S):
            try:
                self.refill()
            except CoordinationError as e:  # the ranks disagree: this rank's next batch raises it
                log.error("rank %d: %s", self.stream.rank, e)
                self.stream.channel.fail(str(e))
                return
            except Exception:  # a store hiccup: serving waits at the grant, the next tick asks again
                log.exception("rank %d: asking the ledger for batches failed; retrying", self.stream.rank)
                self._stop.wait(1.0)

    # ------------------------------------------------------------------------- publisher
    def _poll_loop(self) -> None:
        while not self._stop.wait(self.cfg.poll_s):
            try:
                self.poll()
            except Exception:
                log.exception("following %s: unexpected error; retrying", self.cfg.uri)

    def poll(self) -> None:
        """Read the publisher once: heartbeat, then the update when the heartbeat names a new one."""
        try:
            alive = self.transport.read("alive")
            with self._lock:
                fresh = self._heartbeat(alive)
            latest = self.transport.read("latest") if fresh else None
        except TransportUnavailable as e:
            with self._lock:
                self.counts["unreachable"] += 1
                self._check_lost(str(e))
            return
        with self._lock:
            self._check_lost("its heartbeat stopped")
            if latest is not None:
                self.consider(latest)
            if self._pending is not None and self._joined and self.ledger.ready():
                self._decide(*self._pending)

    def _heartbeat(self, raw: bytes | None) -> bool:
        """Track the heartbeat; True when ``latest`` should be read (the heartbeat names an update
        other than the last one read, or there is no usable heartbeat)."""
        if raw is None:
            return True
        try:
            doc = wire.parse(raw, wire.ALIVE_FORMAT, self.token)
        except wire.WireError:
            return True  # the update is checked (and rejected, if need be) on its own
        if self.run_id is not None and doc["run_id"] != self.run_id:
            return True
        beat = (doc["run_id"], doc["beat"], doc["time"])  # time too: a restarted publisher counts beats anew
        if beat != self._beat:
            self._beat, self._beat_at = beat, time.monotonic()
            if self.publisher == "lost":
                log.warning("following %s: the publisher is back (run %s, seq %d)", self.cfg.uri, doc["run_id"],
                            doc["seq"])
            self.publisher = "alive"
        if doc["closed"]:
            self.publisher = "finished"
        return self._last_read is None or (doc["seq"], doc.get("digest")) != self._last_read

    def _check_lost(self, why: str) -> None:
        if self.publisher in ("lost", "finished") or time.monotonic() - self._beat_at < self.cfg.dead_after_s:
            return
        # the warning first: whoever sees the state "lost" (stats()) has the warning in the log too
        log.warning("following %s: no sign of the publisher for %.0f s (%s); the job keeps weights v%d and keeps "
                    "polling", self.cfg.uri, self.cfg.dead_after_s, why, self.stream.channel._read_history()[1][-1]["version"])
        self.publisher = "lost"

    def consider(self, raw: bytes) -> None:
        """Classify one read of ``latest``: nothing new, ignored (counted), rejected or accepted."""
        try:
            doc = wire.parse(raw, wire.UPDATE_FORMAT, self.token)
        except wire.WireError as e:
            return self._reject(raw, None, str(e))
        digest = hashlib.sha256(raw).hexdigest()
        if self._last_read is not None and self._last_read[0] == doc["seq"] and self._last_read[1] in (None, digest):
            self._last_read = (doc["seq"], digest)  # the same update read again: nothing new
            return
        self._last_read = (doc["seq"], digest)
        if self.run_id is not None and doc["run_id"] != self.run_id:
            return self._reject(raw, doc, f"run id {doc['run_id']!r} is not the followed run {self.run_id!r}")
        seq = doc["seq"]
        if seq > self.seen_seq:
            self.seen_seq = seq
            try:
                requested = self._check_weights(doc)
            except (wire.WireError, WeightsError) as e:
                return self._reject(raw, doc, str(e))
            self._pending = (doc, requested)
        else:
            kind = "duplicates" if seq == self.seen_seq else "stale" if seq <= self.applied_seq else "out_of_order"
            self.counts[kind] += 1
            log.info("following %s: ignored update seq %d (%s; applied seq %d)", self.cfg.uri, seq, kind,
                     self.applied_seq)

    def _check_weights(self, doc: dict):
        units = doc.get("units")
        if units is not None and units != self.stream.weight_units:
            raise WeightsError(f"the update's weights are in {units}, this stream's weight_units is "
                               f"{self.stream.weight_units!r}; construct the stream with weight_units={units!r}")
        return normalize_weights(wire.weights_of(doc), self.stream.names)

    def _reject(self, raw: bytes, doc: dict | None, reason: str) -> None:
        self.counts["rejected"] += 1
        self.last_rejection = reason
        seq = doc["seq"] if doc else "?"
        log.warning("following %s: rejected update seq %s (%s); the job keeps its current weights",
                    self.cfg.uri, seq, reason)

    def _decide(self, doc: dict, requested) -> None:
        stream = self.stream
        meta = {"run_id": doc["run_id"], "seq": doc["seq"], "published": doc["time"]}

        def make(version: int, batch: int, history: list) -> dict | None:
            last = _publisher_of(history)
            if last is not None and last["run_id"] == doc["run_id"] and last["seq"] >= doc["seq"]:
                return None  # the job has it already (restored with a state, or decided before)
            entry = stream._history_entry(version, batch, requested, time.time())
            entry["publisher"] = meta
            return entry

        with self._lock:
            entry, grant, history = self.ledger.decide(make)
            self._install(grant, history)
            self._pending = None
            if entry is None:  # read before this rank joined with a history that has it: not news
                return
            self.run_id = self.run_id or doc["run_id"]
            self.applied_seq = doc["seq"]
            self.counts["applied"] += 1

    # ------------------------------------------------------------------------- lifecycle
    def reset(self, history: list) -> None:
        """After `load_state_dict`: a new ledger session, positions from the restored history."""
        with self._lock:
            self.ledger.reset()
            self._start_state(history)

    def stats(self) -> dict:
        """Telemetry: publisher state, applied / ignored / rejected counts, the run and seqs."""
        out = {"uri": self.cfg.uri, "decider": self.decider, "run_id": self.run_id, "applied_seq": self.applied_seq,
               "grant": self.stream.channel.progress()[2], "lookahead": self.cfg.lookahead}
        if self.decider:
            out.update(self.counts, seen_seq=self.seen_seq, publisher=self.publisher,
                       silent_for_s=round(time.monotonic() - self._beat_at, 3), last_rejection=self.last_rejection)
        return out

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=5)
        if self.transport is not None:
            self.transport.close()
