"""The data plane's protocol, driven without Ray: a real pool server, real sockets, real shared memory."""

from __future__ import annotations

import pytest
import torch

from experts.dataplane import DataPlaneError, PoolChannel
from experts.pool import ExpertPool


@pytest.fixture(scope="module")
def pool(fixture_dir):
    p = ExpertPool(str(fixture_dir), list(range(8, 24)))
    p.open_data_plane()
    yield p
    p.data_plane.close()


def batch(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 64, generator=g)
    ids = torch.randint(8, 24, (n, 2), generator=g)
    ids[0, 1] = -1  # a pair computed elsewhere
    return x, ids, torch.rand(n, 2, generator=g)


@pytest.mark.parametrize("same_node", [True, False], ids=["shared-memory", "tcp-inline"])
def test_results_equal_the_bank_bitwise_as_regions_grow(pool, same_node):
    channel = PoolChannel(pool.open_data_plane()["address"], same_node=same_node)
    try:
        for step, n in enumerate([3, 700, 1, 2000, 5]):  # regions grow past their first size
            x, ids, w = batch(n, step)
            layer = step % 3
            channel.send(layer, x, ids, w)
            got = channel.recv().clone()
            with torch.inference_mode():
                assert torch.equal(got, pool.banks[layer](x, ids, w))
    finally:
        channel.close()


def test_a_failing_request_is_reported_and_the_connection_survives(pool):
    channel = PoolChannel(pool.open_data_plane()["address"], same_node=True)
    try:
        x, ids, w = batch(4, 0)
        channel.send(0, x, torch.full_like(ids, 3), w)  # expert 3 is not held here
        with pytest.raises(DataPlaneError, match="pool failed"):
            channel.recv()
        channel.send(1, x, ids, w)
        with torch.inference_mode():
            assert torch.equal(channel.recv(), pool.banks[1](x, ids, w))
    finally:
        channel.close()


def test_a_closed_pool_is_a_data_plane_error(fixture_dir):
    p = ExpertPool(str(fixture_dir), [0, 1])
    channel = PoolChannel(p.open_data_plane()["address"], same_node=True)
    p.data_plane.close()
    channel.sock.close()  # the connection is gone, as when the pool process dies
    with pytest.raises(DataPlaneError):
        channel.send(0, *batch(2, 0))
