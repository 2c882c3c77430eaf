"""`WeightPublisher`: publishes each new mixture of a search where following streams read it.

It is a search sink (``set_weights(weights)``, like a live `MixtureStream`), so ``run_method(...,
sink=WeightPublisher(uri))`` or ``fastmix-data search ... --publish URI`` publish every new mixture
(through the search's one publishing hook, ``RunContext.publish``).
Each update gets the next ``seq`` of the run; the run id and the last seq are kept in
``<state_dir>/publisher.json`` (written atomically after each update), so a publisher restarted on
the same search directory continues the sequence, as the search continues from its checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

from fastmix_data.errors import WeightsError
from fastmix_data.live import wire
from fastmix_data.live.transport import open_transport, token_from_env, write_atomic

log = logging.getLogger(__name__)

STATE_FILE = "publisher.json"
STATE_FORMAT = "fastmix_data/publisher-state"


class WeightPublisher:
    """Publish mixture weights to ``uri`` for every rank of a job that follows it.

    Args:
        uri: ``tcp://HOST:PORT`` (this process listens there; port 0 picks a free port, see
            ``self.uri``) or a directory / fsspec URL.
        state_dir: where ``publisher.json`` (run id, last seq, URI) is kept; usually the search's
            output directory. None: nothing kept (a restart starts a new run).
        run_id: the run's id (default: the one in ``state_dir``, else a new random one).
        token: shared secret that signs every document (default ``$FASTMIX_DATA_TOKEN``).
        allow_remote: listen on a non-loopback TCP address (needs a token).
        units: what the weights measure, "tokens" or "samples" (a following stream with other
            ``weight_units`` rejects the updates). Default "tokens" (what the search finds).
        heartbeat_s: seconds between two heartbeats. Default 1.
    """

    def __init__(self, uri: str, *, state_dir: str | os.PathLike | None = None, run_id: str | None = None,
                 token: str | None = None, allow_remote: bool = False, units: str = "tokens",
                 heartbeat_s: float = 1.0):
        if units not in ("tokens", "samples"):
            raise WeightsError(f"units must be 'tokens' or 'samples', got {units!r}")
        self.token = token_from_env(token)
        self.transport = open_transport(uri, serve=True, token=self.token, allow_remote=allow_remote)
        self.uri = self.transport.uri
        self.units = units
        self.state_path = Path(state_dir) / STATE_FILE if state_dir is not None else None
        saved = self._saved_state()
        self.run_id = run_id or saved.get("run_id") or uuid.uuid4().hex[:12]
        self.seq = max(int(saved.get("seq", 0)) if saved.get("run_id") == self.run_id else 0, self._published_seq())
        self._digest: str | None = None
        self._beat = 0
        self._closed = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._save_state()
        self._write_alive()
        self._thread = threading.Thread(target=self._heartbeat_loop, args=(heartbeat_s,), name="fastmix-publisher",
                                        daemon=True)
        self._thread.start()
        log.info("publishing weights of run %s at %s (next seq %d)", self.run_id, self.uri, self.seq + 1)

    def _saved_state(self) -> dict:
        if self.state_path is None or not self.state_path.exists():
            return {}
        doc = json.loads(self.state_path.read_text())
        return doc if doc.get("format") == STATE_FORMAT else {}

    def _published_seq(self) -> int:
        """The seq of this run's update already at the URI (a shared disk or bucket outlives us)."""
        raw = self.transport.read("latest")
        if raw is None:
            return 0
        try:
            doc = wire.parse(raw, wire.UPDATE_FORMAT, self.token)
        except wire.WireError:
            return 0
        return doc["seq"] if doc["run_id"] == self.run_id else 0

    def _save_state(self) -> None:
        if self.state_path is None:
            return
        doc = {"format": STATE_FORMAT, "run_id": self.run_id, "seq": self.seq, "uri": self.uri}
        write_atomic(None, str(self.state_path), json.dumps(doc).encode(), local=True)

    def set_weights(self, weights: Mapping[str, float], step: int | None = None) -> None:
        """Publish ``weights`` ({source: weight}) as the run's next update.

        Returns None: the job, not the publisher, decides the batch where they apply (it records it
        in its weight history).

        Raises:
            WeightsError: a weight that is not a finite number >= 0, or all zero.
        """
        for name, v in weights.items():
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise WeightsError(f"cannot publish weight {v!r} for source {name!r}: weights are finite numbers >= 0")
        if not any(v > 0 for v in weights.values()):
            raise WeightsError(f"cannot publish all-zero weights {dict(weights)}")
        with self._lock:
            self.seq += 1
            doc = wire.update_document(self.run_id, self.seq, weights, time=time.time(), units=self.units, step=step)
            raw = wire.sign(doc, self.token)
            self.transport.write("latest", raw)
            self._digest = hashlib.sha256(raw).hexdigest()
            self._write_alive()
            self._save_state()
        log.info("published weights seq %d of run %s: %s", self.seq, self.run_id, dict(weights))

    def _write_alive(self) -> None:
        self._beat += 1
        doc = wire.alive_document(self.run_id, self.seq, self._digest, self._beat, time=time.time(), closed=self._closed)
        self.transport.write("alive", wire.sign(doc, self.token))

    def _heartbeat_loop(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                with self._lock:
                    self._write_alive()
            except Exception as e:  # a storage hiccup: followers see a late heartbeat, not a crash
                log.warning("publisher heartbeat to %s failed: %s", self.uri, e)

    def close(self, linger_s: float = 1.0) -> None:
        """Say the run is finished (followers stop expecting heartbeats), stop the heartbeat and,
        for a TCP publisher, keep serving ``linger_s`` seconds so that followers read that."""
        if self._closed:
            return
        self._stop.set()
        self._thread.join(timeout=5)
        with self._lock:
            self._closed = True
            self._write_alive()
        if self.uri.startswith("tcp://") and linger_s > 0:
            time.sleep(linger_s)
        self.transport.close()

    def __enter__(self) -> WeightPublisher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
