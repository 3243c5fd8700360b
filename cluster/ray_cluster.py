"""Start an embedded local Ray cluster (the default) or join an existing one by address.

Local clusters get settings measured on this kind of machine (docs/TRANSPORT.md): objects up to
1 MiB travel inline with the call instead of through the object store (4x faster per layer), no
dashboard and no usage stats. They are confined to this host: the node address is 127.0.0.1, so
the GCS, the raylet, every worker and the dashboard agent listen on loopback only (checked with
the listening sockets of every process in a test). Ray's token auth stays on (Ray 2.60 turns it on
for a plain `ray.init`, with the token in `~/.ray/auth_token`). Joining an existing cluster changes
none of its settings: docs/SECURITY.md says what its operator must set.
"""

from __future__ import annotations

import os

import ray

INLINE_OBJECT_BYTES = 1 << 20
# Ray's switch for a cluster of this host alone: with it off, Ray takes 127.0.0.1 as the node
# address and binds its servers there (it is read when ray is imported, so it is also set below).
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def confine_to_loopback() -> None:
    """Make an embedded cluster started from this process bind to 127.0.0.1 only."""
    from ray._private import ray_constants

    os.environ[LOCAL_ONLY_ENV] = "0"  # for the processes Ray starts
    ray_constants.ENABLE_RAY_CLUSTER = False  # this process imported ray before the variable was set


def connect(
    address: str | None = None, num_cpus: int | None = None, inline_object_bytes: int = INLINE_OBJECT_BYTES
) -> bool:
    """Make sure this process is connected to Ray; returns True if it started a local cluster.

    `address`: None starts an embedded cluster on loopback; "auto" or "ray://host:port" joins an
    existing one.
    `num_cpus`: logical CPUs of an embedded cluster (each pool and gateway actor takes one).
    `inline_object_bytes`: arguments and results up to this size travel inside the call message.
    """
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        ray.init(address=address, log_to_driver=False)
        return False
    confine_to_loopback()
    ray.init(
        num_cpus=num_cpus or max(8, os.cpu_count() or 1),
        include_dashboard=False,
        log_to_driver=False,
        _system_config={"max_direct_call_object_size": inline_object_bytes},
    )
    return True
