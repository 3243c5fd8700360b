"""A two-node Ray cluster simulated on this machine (`ray.cluster_utils.Cluster`, as Ray's own tests
do): the head node runs the gateway (this driver), a second node offers `pool_node` and runs the
pools. Prints one JSON line: the generated ids per golden case and each data-plane channel's kind.
Run by tests/cluster/test_two_nodes.py in its own process (a process can join one cluster only)."""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # both nodes on 127.0.0.1, as the embedded cluster

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402


def main(fixture_dir: str) -> None:
    from cluster.controller import stop_controller
    from cluster.gateway_host import attach_backend
    from cluster.pools import PoolConfig
    from gateway.sampling import SamplingParams

    golden = json.loads(open(os.path.join(fixture_dir, "golden.json")).read())
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=4, resources={"pool_node": 8})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        backend = attach_backend(
            "two-nodes", PoolConfig(fixture_dir, pools=2, pool_resources={"pool_node": 1})
        )
        engine = backend.engine
        seqs = engine.generate(
            [c["prompt_ids"] for c in golden["cases"]], SamplingParams(max_tokens=16, ignore_eod=True)
        )
        disp = engine.dispatcher
        pool_nodes = {ray.get(w.info.remote())["node_id"] for w in disp.workers}
        print(
            json.dumps(
                {
                    "tokens": [s.output_ids for s in seqs],
                    "expected": [c["generated_ids"] for c in golden["cases"]],
                    "channels": sorted({"shared" if c.shared else "tcp" for c in disp._channels.values()}),
                    "fallbacks": disp.fallbacks,
                    "gateway_node": ray.get_runtime_context().get_node_id(),
                    "pool_nodes": sorted(pool_nodes),
                }
            ),
            flush=True,
        )
        backend.close()
        stop_controller("two-nodes")
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
