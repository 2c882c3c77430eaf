"""A scripted publisher process for the end-to-end tests (run as a script, killed by the test).

    python tests/live_publisher.py URI STATE_DIR CONTROL_DIR

Publishes the weights in ``CONTROL_DIR/publish-<seq>.json`` when that file appears (seq = its next
seq: a restarted publisher continues), closes when ``CONTROL_DIR/close`` appears. Its URI is in
``STATE_DIR/publisher.json``.
"""

from __future__ import annotations

import json
import os
import sys
import time

from fastmix_data.live import WeightPublisher


def main(uri: str, state_dir: str, control: str) -> None:
    pub = WeightPublisher(uri, state_dir=state_dir, units="tokens", heartbeat_s=0.2)
    while not os.path.exists(os.path.join(control, "close")):
        trigger = os.path.join(control, f"publish-{pub.seq + 1}.json")
        if os.path.exists(trigger):
            with open(trigger) as f:
                pub.set_weights(json.load(f))
        time.sleep(0.05)
    pub.close()


if __name__ == "__main__":
    main(*sys.argv[1:4])
