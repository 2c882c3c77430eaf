"""The published documents (JSON, signed with a shared token) and the two transports."""

from __future__ import annotations

import json
import pickle
import socket

import pytest

from fastmix_data.errors import PublishError, WeightsError
from fastmix_data.live import WeightPublisher, wire
from fastmix_data.live.transport import FileTransport, StoreTransport, open_transport, split_tcp


def test_documents_round_trip_and_signatures_are_checked():
    doc = wire.update_document("run1", 3, {"a": 0.25, "b": 0.75}, time=1.5, units="tokens", step=40)
    raw = wire.sign(doc, "secret")
    back = wire.parse(raw, wire.UPDATE_FORMAT, "secret")
    assert back["seq"] == 3 and wire.weights_of(back) == {"a": 0.25, "b": 0.75}
    with pytest.raises(wire.WireError, match="signature"):
        wire.parse(raw, wire.UPDATE_FORMAT, "another token")
    with pytest.raises(wire.WireError, match="signature"):
        wire.parse(wire.sign(doc, None), wire.UPDATE_FORMAT, "secret")  # unsigned, token expected
    tampered = json.loads(raw)
    tampered["weights"]["a"] = 0.9
    with pytest.raises(wire.WireError, match="signature"):
        wire.parse(json.dumps(tampered).encode(), wire.UPDATE_FORMAT, "secret")


@pytest.mark.parametrize(
    "raw, reason",
    [
        (pickle.dumps({"weights": {"a": 1.0}}), "JSON"),
        (b'{"format": "fastmix_data/weights-update", "version": 1, "run_id": "r", "seq": 1, "weights": {"a": NaN}}',
         "NaN"),
        (b"[1, 2]", "object"),
        (b'{"format": "other"}', "format"),
        (b'{"format": "fastmix_data/weights-update", "version": 9}', "version"),
        (b'{"format": "fastmix_data/weights-update", "version": 1, "run_id": "r", "seq": -1}', "seq"),
        (b" " * (wire.MAX_DOCUMENT_BYTES + 1), "limit"),
    ],
)
def test_bad_documents_are_refused_with_the_reason(raw, reason):
    with pytest.raises(wire.WireError, match=reason):
        wire.parse(raw, wire.UPDATE_FORMAT, None)


def test_weights_must_be_finite_numbers():
    for weights in ({"a": "1"}, {"a": True}, {}, [1.0]):
        doc = {"weights": weights}
        with pytest.raises(wire.WireError):
            wire.weights_of(doc)


def _listening_addresses(port: int) -> set[str]:
    """Local addresses of the LISTEN sockets on ``port`` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in list(f)[1:]:
                local, state = line.split()[1], line.split()[3]
                addr, p = local.split(":")
                if state == "0A" and int(p, 16) == port:
                    found.add(addr)
    return found


def test_tcp_publisher_listens_on_loopback_only():
    transport = open_transport("tcp://127.0.0.1:0", serve=True)
    try:
        assert _listening_addresses(transport.port) == {"0100007F"}  # 127.0.0.1, not 0.0.0.0 or ::
        transport.write("latest", b"{}")
        reader = StoreTransport("127.0.0.1", transport.port)
        assert reader.read("latest") == b"{}" and reader.read("alive") is None
    finally:
        transport.close()


def test_remote_addresses_need_a_flag_and_a_token(monkeypatch):
    monkeypatch.delenv("FASTMIX_DATA_TOKEN", raising=False)
    with pytest.raises(PublishError, match="allow_remote"):
        open_transport("tcp://0.0.0.0:0", serve=True)
    with pytest.raises(PublishError, match="token"):
        open_transport("tcp://0.0.0.0:0", serve=True, allow_remote=True)
    with pytest.raises(PublishError, match="token"):
        open_transport("tcp://10.1.2.3:29600", serve=False)
    with pytest.raises(PublishError, match="PORT"):
        split_tcp("tcp://127.0.0.1")
    # with both, it listens on every interface
    transport = open_transport("tcp://0.0.0.0:0", serve=True, token="t", allow_remote=True)
    try:
        assert _listening_addresses(transport.port) == {"00000000"}
    finally:
        transport.close()


def test_follower_side_reports_an_absent_publisher():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    from fastmix_data.live.transport import TransportUnavailable

    with pytest.raises(TransportUnavailable, match="no publisher"):
        StoreTransport("127.0.0.1", port).read("alive")


def test_file_transport_replaces_whole_documents(tmp_path):
    t = FileTransport(f"file://{tmp_path}/pub")
    assert t.read("latest") is None
    t.write("latest", b"one")
    t.write("latest", b"two")
    assert t.read("latest") == b"two" and (tmp_path / "pub" / "latest.json").read_bytes() == b"two"
    assert [p.name for p in (tmp_path / "pub").iterdir()] == ["latest.json"]  # no temp file left


def test_publisher_numbers_updates_and_a_restart_continues(tmp_path):
    uri, state = str(tmp_path / "pub"), tmp_path / "search"
    with WeightPublisher(uri, state_dir=state, units="samples", heartbeat_s=60) as pub:
        run = pub.run_id
        for w in (0.2, 0.4, 0.6):
            pub.set_weights({"a": w, "b": 1 - w})
        with pytest.raises(WeightsError, match="finite"):
            pub.set_weights({"a": float("nan"), "b": 1.0})
        with pytest.raises(WeightsError, match="all-zero"):
            pub.set_weights({"a": 0.0, "b": 0.0})
    latest = json.loads((tmp_path / "pub" / "latest.json").read_text())
    alive = json.loads((tmp_path / "pub" / "alive.json").read_text())
    assert (latest["seq"], latest["run_id"], latest["units"]) == (3, run, "samples")
    assert alive["closed"] and alive["seq"] == 3
    with WeightPublisher(uri, state_dir=state, heartbeat_s=60) as again:  # restarted: same run, next seq
        assert again.run_id == run and again.seq == 3
        again.set_weights({"a": 1.0, "b": 0.0})
    with WeightPublisher(uri, run_id=run, heartbeat_s=60) as no_state:  # from what is published
        assert no_state.seq == 4
    with WeightPublisher(uri, heartbeat_s=60) as fresh:  # no state, no run id: a new run
        assert fresh.run_id != run and fresh.seq == 0
