"""The data plane's protocol, driven without Ray: a real pool server, real sockets, real shared memory."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import time

import msgpack
import numpy as np
import pytest
import torch

from experts.dataplane import DataPlaneServer
from gateway.channel import PoolChannel, SharedBatch
from router.dataplane import DataPlaneError, DataPlaneLimits, SharedRequest, handshake_mac, sweep_dead_regions
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


def assert_round_trip_exact(
    pool, channel: PoolChannel, batch: SharedBatch, layer: int, x, ids, w, skip: int = 0
) -> None:
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


# ---- who may connect, and what a header may ask for ----------------------------------------------
def raw_connection(address: dict, same_node: bool, key: bytes | None) -> socket.socket:
    """A connection made by hand: it answers the nonce with `key`'s HMAC (None: stays silent)."""
    if same_node:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.connect(address["uds"])
    else:
        sock = socket.create_connection(tuple(address["tcp"]))
    sock.settimeout(10)
    nonce = sock.recv(64)
    assert len(nonce) == 32
    if key is not None:
        sock.sendall(handshake_mac(key, nonce))
    return sock


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """The peer closed the connection (recv gives b"" or a reset) before `seconds` passed."""
    sock.settimeout(seconds)
    try:
        while True:
            if not sock.recv(1 << 16):
                return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


@pytest.mark.parametrize("same_node", [True, False], ids=["unix", "tcp"])
def test_an_unauthenticated_connection_is_refused(pool, same_node):
    address = pool.open_data_plane()["address"]
    sock = raw_connection(address, same_node, key=b"not the key")
    assert closed_within(sock, 5)
    sock.close()
    with pytest.raises(DataPlaneError, match="refused"):
        PoolChannel({**address, "key": "00" * 32}, same_node=same_node)
    good = PoolChannel(address, same_node=same_node)  # the real key still gets in
    good.close()


def test_oversized_and_negative_shared_header_fields_are_refused_naming_the_field(pool):
    """Each refusal comes back at once, from the header alone (no region, no payload is touched),
    and ends that connection."""
    address = pool.open_data_plane()["address"]
    key = bytes.fromhex(address["key"])
    batch = SharedBatch()
    batch.reserve(4, 2, 64, torch.float32)
    bad = {
        "tokens": SharedRequest(0, 1 << 20, 2, 0, 8, "float32", batch.name),
        "layer": SharedRequest(-1, 4, 2, 0, 8, "float32", batch.name),
        "layer ": SharedRequest(3, 4, 2, 0, 8, "float32", batch.name),  # the fixture has 3 layers
        "top_k": SharedRequest(0, 4, 64, 0, 8, "float32", batch.name),
        "end": SharedRequest(0, 4, 2, 0, 9, "float32", batch.name),
        "start": SharedRequest(0, 4, 2, -1, 8, "float32", batch.name),
        "dtype": SharedRequest(0, 4, 2, 0, 8, "int8", batch.name),
        "region": SharedRequest(0, 4, 2, 0, 8, "float32", "../../etc/passwd"),
    }
    try:
        for field, req in bad.items():
            sock = raw_connection(address, True, key)
            assert sock.recv(1) == b"\x01"
            sock.send(msgpack.packb(tuple(req)))
            reply = msgpack.unpackb(sock.recv(1 << 16))
            assert reply["error"].startswith(f"{field.strip()}:"), reply
            assert closed_within(sock, 5)
            sock.close()
    finally:
        batch.close()


def test_negative_ids_in_a_plan_are_refused_not_wrapped(pool):
    """A plan whose expert id, row or slot is -1 (numpy and torch would wrap it to a real entry)."""
    address = pool.open_data_plane()["address"]
    channel, batch = PoolChannel(address, same_node=True), SharedBatch()
    try:
        x, ids, w = batch_of(4, 3)
        for row, what in ((2, "expert_ids"), (0, "plan"), (1, "plan")):
            r = ask(channel, batch, 0, x, ids, w)
            channel.recv()  # that plan was fine; now the same plan with one entry -1
            batch._views.index[row, 0] = -1
            channel.send_shared(0, batch, 0, r.rows.numel())
            with pytest.raises(DataPlaneError, match=what):
                channel.recv()
        assert_round_trip_exact(pool, channel, batch, 0, x, ids, w)  # the connection still serves
    finally:
        channel.close()
        batch.close()


def test_an_oversized_inline_header_is_refused_without_reading_a_payload(pool):
    address = pool.open_data_plane()["address"]
    sock = raw_connection(address, False, bytes.fromhex(address["key"]))
    assert sock.recv(1) == b"\x01"
    head = msgpack.packb({"layer": 0, "t": 1 << 20, "dtype": "float32"})
    sock.sendall(struct.pack("<I", len(head)) + head)  # and no payload
    size = struct.unpack("<I", sock.recv(4))[0]
    assert msgpack.unpackb(sock.recv(size))["error"].startswith("t:")
    assert closed_within(sock, 5)
    sock.close()


def test_silent_connections_and_missing_payloads_are_dropped_after_the_deadline(pool):
    limits = DataPlaneLimits(
        num_layers=3, num_experts=32, max_tokens=64, top_k=2, handshake_timeout_s=0.3, payload_timeout_s=0.3
    )
    server = DataPlaneServer(pool.compute_pairs, 64, limits)
    try:
        address = server.address()
        for same_node in (True, False):  # connects, reads the nonce, says nothing
            sock = raw_connection(address, same_node, key=None)
            t0 = time.monotonic()
            assert closed_within(sock, 5) and time.monotonic() - t0 < 3
            sock.close()
        sock = raw_connection(address, False, bytes.fromhex(address["key"]))
        assert sock.recv(1) == b"\x01"
        time.sleep(0.6)  # an authenticated connection may idle between requests
        head = msgpack.packb({"layer": 0, "t": 8, "dtype": "float32"})
        sock.sendall(struct.pack("<I", len(head)) + head + b"\0" * 100)  # most of the payload never comes
        t0 = time.monotonic()
        assert closed_within(sock, 5) and time.monotonic() - t0 < 3
        sock.close()
        channel = PoolChannel(address, same_node=False)  # a proper peer is served meanwhile
        x, ids, w = batch_of(3, 0)
        channel.send(0, x, ids[:, 0], w[:, 0])
        assert channel.recv().shape == (3, 64)
        channel.close()
    finally:
        server.close()


def test_regions_of_dead_processes_are_swept(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    names = [f"yuan-{dead.pid}-abc123", f"yuan-{os.getpid()}-def456", "psm_unrelated"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    assert sweep_dead_regions(str(tmp_path)) == [names[0]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:])
