"""Ray shell over `ExpertPool`: one actor process per pool replica."""

from __future__ import annotations

import ray

from experts.pool import ExpertPool


@ray.remote
class ExpertPoolActor(ExpertPool):
    """`ExpertPool` as a Ray actor; calls run one at a time, in arrival order. It names the Ray node
    it runs on (gateways on the same node id use shared memory, others TCP) and serves TCP on the
    node's address."""

    def open_data_plane(self, tcp_host: str | None = None) -> dict:
        return super().open_data_plane(tcp_host or ray.util.get_node_ip_address())
