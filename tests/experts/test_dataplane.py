"""The data plane's protocol, driven without Ray: a real pool server, real sockets, real shared memory."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import torch

from experts.dataplane import DataPlaneError, PoolChannel, SharedBatch
from experts.pool import ExpertPool
from router.plan import DispatchPlan, WorkerRequest


@pytest.fixture(scope="module")
def pool(fixture_dir):
    p = ExpertPool(str(fixture_dir), list(range(8, 24)))
    p.open_data_plane()
    yield p
    p.data_plane.close()


def batch_of(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 64, generator=g)
    ids = torch.randint(8, 24, (n, 2), generator=g)
    ids[0, 1] = -1  # a pair computed elsewhere
    return x, ids, torch.rand(n, 2, generator=g)


def ask(channel: PoolChannel, batch: SharedBatch, layer: int, x, ids, w, skip: int = 0) -> WorkerRequest:
    """Send the batch's pairs (those with id -1 are another worker's) from pair `skip` on, the way
    the dispatcher sends one worker's span of a plan; returns what was sent."""
    A, flat = ids.shape[1], ids.reshape(-1)
    keep = (flat >= 0).nonzero().squeeze(1)
    index, weights = batch.reserve(x.shape[0], A, x.shape[1], x.dtype)  # the plan goes in the batch
    k = keep.numel()
    index[:, :k] = np.stack([(keep // A).numpy(), keep.numpy(), flat[keep].numpy()])
    weights[:k] = w.reshape(-1)[keep]
    plan = DispatchPlan(index[:, :k], weights[:k], [], ids.shape[0], A)
    sent = plan.request((0, skip, k))
    if channel.shared:
        batch.write(x)
        channel.send_shared(layer, batch, skip, k)
    else:
        channel.send(layer, x, sent.expert_ids.view(-1), sent.weights.view(-1), rows=sent.rows)
    return sent


def answer(channel: PoolChannel, batch: SharedBatch, sent: WorkerRequest) -> torch.Tensor:
    """The pool's outputs for the pairs `sent`: read from their shared slots, or off the socket."""
    got = channel.recv()
    return batch.outputs[sent.slots] if channel.shared else got


def assert_round_trip_exact(pool, channel: PoolChannel, batch: SharedBatch, layer: int, x, ids, w,
                            skip: int = 0) -> None:
    """One request through `channel`: its outputs equal the pool's own bank on the same pairs, bitwise."""
    r = ask(channel, batch, layer, x, ids, w, skip)
    got = answer(channel, batch, r)
    with torch.inference_mode():
        assert torch.equal(got, pool.banks[layer](x[r.rows], r.expert_ids, r.weights))


@pytest.mark.parametrize("same_node", [True, False], ids=["shared-memory", "tcp-inline"])
def test_results_equal_the_bank_bitwise_as_regions_grow(pool, same_node):
    channel, batch = PoolChannel(pool.open_data_plane()["address"], same_node=same_node), SharedBatch()
    try:
        for step, n in enumerate([3, 700, 1, 2000, 5]):  # regions grow past their first size
            assert_round_trip_exact(pool, channel, batch, step % 3, *batch_of(n, step), skip=step % 2)
    finally:
        channel.close()
        batch.close()


def test_a_failing_request_is_reported_and_the_connection_survives(pool):
    channel, batch = PoolChannel(pool.open_data_plane()["address"], same_node=True), SharedBatch()
    try:
        x, ids, w = batch_of(4, 0)
        ask(channel, batch, 0, x, torch.full_like(ids, 3), w)  # expert 3 is not held here
        with pytest.raises(DataPlaneError, match="pool failed"):
            channel.recv()
        assert_round_trip_exact(pool, channel, batch, 1, x, ids, w)
    finally:
        channel.close()
        batch.close()


def test_a_malformed_header_closes_only_its_connection(pool):
    """A message that is no `SharedRequest` ends that connection: the gateway's next receive is a
    DataPlaneError (its dispatcher then falls back to Ray calls), and other connections keep working."""
    address = pool.open_data_plane()["address"]
    bad, good = PoolChannel(address, same_node=True), PoolChannel(address, same_node=True)
    batch = SharedBatch()
    try:
        bad.sock.send(msgpack.packb([1, 2]))
        with pytest.raises(DataPlaneError, match="closed"):
            bad.recv()
        assert_round_trip_exact(pool, good, batch, 2, *batch_of(6, 1))
    finally:
        bad.close()
        good.close()
        batch.close()


def test_a_closed_pool_is_a_data_plane_error(fixture_dir):
    p = ExpertPool(str(fixture_dir), [0, 1])
    channel = PoolChannel(p.open_data_plane()["address"], same_node=False)
    p.data_plane.close()
    channel.sock.close()  # the connection is gone, as when the pool process dies
    with pytest.raises(DataPlaneError):
        x, ids, w = batch_of(2, 0)
        channel.send(0, x, ids[:, 0], w[:, 0])
