"""A `fastmix-data` driver process for the Ray tests: connects to the test's cluster with the
fault-injection hook (tests/ray_hooks.py), then runs the command line given after the address.

Usage: python tests/ray_driver.py RAY_ADDRESS fastmix-data-args...
"""

from __future__ import annotations

import sys

import ray

from fastmix_data.cli import main

if __name__ == "__main__":
    ray.init(
        address=sys.argv[1],
        log_to_driver=False,
        runtime_env={"worker_process_setup_hook": "ray_hooks.install"},
    )
    sys.exit(main(sys.argv[2:]))
