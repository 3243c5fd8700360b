"""The gateway's end of the data plane: `SharedBatch` (one lane's batch, plan and output slots in a
shared region that pools on this node map) and `PoolChannel` (one connection to one pool, which
proves the deployment's key first). The wire format is in `router/dataplane.py`.
"""

from __future__ import annotations

import socket
import struct

import msgpack
import numpy as np
import torch

from router.dataplane import (
    ACK,
    DTYPE_NAMES,
    MESSAGE_MAX,
    NONCE_BYTES,
    DataPlaneError,
    DataPlaneTimeout,
    Framed,
    PairBatch,
    Region,
    SharedRequest,
    batch_layout,
    batch_views,
    handshake_mac,
    raw_bytes,
    recv_exact,
    tensor_at,
)


class SharedBatch:
    """One lane's layer batch, dispatch plan and output slots in shared memory: written once per
    layer, mapped by every pool on this node, each of which fills its pairs' slots. Rewritten only
    after every reply to the previous write has come back."""

    def __init__(self) -> None:
        self.region = Region()
        self.shape: tuple[int, int, int, torch.dtype] | None = None  # T, A, d, dtype of the batch laid out
        self.name = ""  # the region's name (it changes when the region grows), kept: read per request
        self._views: PairBatch | None = None

    def reserve(self, tokens: int, top_k: int, d: int, dtype: torch.dtype) -> tuple[np.ndarray, torch.Tensor]:
        """Room for a batch of this shape; returns where its plan's index `[3, T*A]` and weights
        `[T*A]` go, so `plan_dispatch` can build them in place."""
        shape = (tokens, top_k, d, dtype)
        if shape != self.shape:
            self._views = None  # let go of the old region's views before it may be unmapped
            self.region.ensure(max(1, sum(batch_layout(*shape))))
            self.shape, self.name = shape, self.region.shm.name
            self._views = batch_views(self.region.shm.buf, *shape)
        return self._views.index, self._views.weights

    def write(self, x: torch.Tensor) -> None:
        """Put x in the batch whose plan was built in `reserve`'s arrays."""
        self._views.x.copy_(x)

    @property
    def outputs(self) -> torch.Tensor:
        """The output slots `[T*A, d]`, one per (token, active expert), filled by the pools."""
        return self._views.out

    def close(self) -> None:
        self._views, self.shape = None, None
        self.region.close()


class PoolChannel:
    """The gateway's connection to one pool: send a layer's request, then `recv` its outputs.
    On the pool's node requests go as `send_shared`, one message each way on a SOCK_SEQPACKET Unix
    socket (batch, plan and outputs are in shared memory); elsewhere as `send`, framed on TCP with
    the rows."""

    def __init__(self, address: dict, same_node: bool, timeout_s: float = 60.0) -> None:
        self.shared = same_node
        if same_node:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            self.sock.settimeout(timeout_s)
            self.sock.connect(address["uds"])
        else:
            self.sock = socket.create_connection(tuple(address["tcp"]), timeout=timeout_s)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # The kernel keeps the timeout (SO_RCVTIMEO/SO_SNDTIMEO) on a blocking socket: one system call
        # per receive, where Python's own timeout adds a poll before each.
        self.sock.settimeout(None)
        timeout = struct.pack("ll", int(timeout_s), int(timeout_s % 1 * 1e6))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeout)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeout)
        self.timeout_s = timeout_s  # the receive deadline the kernel holds now
        self._prove(bytes.fromhex(address["key"]))
        self._framed = None if same_node else Framed(self.sock)  # inline requests
        self._packer = msgpack.Packer()  # shared requests: a message is one packed header
        self._batch_name: str | None = None  # the shared batch region the pool last heard of
        self._pending: tuple | None = None  # the awaited inline reply's (d, dtype)
        self.last_compute_s = 0.0  # the pool's own time for the last request's expert math

    def _prove(self, key: bytes) -> None:
        """Answer the pool's nonce with its HMAC; the pool acknowledges, or closes on a wrong key."""
        try:
            nonce = recv_exact(self.sock, NONCE_BYTES)
            if nonce is None:
                raise DataPlaneError("data plane closed before its handshake")
            self.sock.sendall(handshake_mac(key, nonce))
            if self.sock.recv(1) != ACK:
                raise DataPlaneError("data plane refused this connection (wrong key)")
        except OSError as e:
            self.sock.close()
            raise DataPlaneError(f"data plane handshake failed: {e}") from e
        except DataPlaneError:
            self.sock.close()
            raise

    def send_shared(self, layer: int, batch: SharedBatch, start: int, end: int) -> None:
        """Ask the pool for the span [start, end) of the plan last written to `batch`."""
        t, a, _, dtype = batch.shape
        region = batch.name if batch.name != self._batch_name else None
        try:
            req = SharedRequest(layer, t, a, start, end, DTYPE_NAMES[dtype], region)
            self.sock.send(self._packer.pack(req))
        except OSError as e:
            raise DataPlaneError(f"data plane send failed: {e}") from e
        self._batch_name = batch.name

    def send(
        self,
        layer: int,
        x: torch.Tensor,
        expert_ids: torch.Tensor,
        weights: torch.Tensor,
        rows: torch.Tensor | None = None,
    ) -> None:
        """Send rows `rows` of x (all rows if None), one pair each, with its expert id and weight `[n]`."""
        xs = x if rows is None else x.index_select(0, rows)
        head = {"layer": layer, "t": xs.shape[0], "dtype": DTYPE_NAMES[x.dtype]}
        try:
            self._framed.send(head, [raw_bytes(t) for t in (xs, expert_ids, weights)])
        except OSError as e:
            raise DataPlaneError(f"data plane send failed: {e}") from e
        self._pending = (x.shape[1], x.dtype)

    def set_deadline(self, seconds: float) -> None:
        """How long the next receives may wait (kept in the kernel: set only when it changes by more
        than a quarter)."""
        if abs(seconds - self.timeout_s) > 0.25 * self.timeout_s:
            self.sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", int(seconds), int(seconds % 1 * 1e6))
            )
            self.timeout_s = seconds

    def recv(self) -> torch.Tensor | None:
        """Wait for the last request's reply: a shared request's outputs are in the batch's slots
        (None), an inline request's come from the socket `[n, d]`, valid until the next request.
        Raises `DataPlaneTimeout` past the deadline (`set_deadline`), `DataPlaneError` otherwise."""
        try:
            if self.shared:
                message = self.sock.recv(MESSAGE_MAX)
                if not message:
                    raise DataPlaneError("data plane connection closed")
                reply = msgpack.unpackb(message)
            else:
                reply = self._framed.header()
            if isinstance(reply, dict):
                raise DataPlaneError(f"pool failed: {reply['error']}")
            n, self.last_compute_s = reply
            if self.shared:
                return None
            d, dtype = self._pending
            nbytes = n * d * dtype.itemsize
            return tensor_at(self._framed.exact(nbytes), 0, nbytes, (n, d), dtype)
        except DataPlaneError:
            raise
        except (BlockingIOError, TimeoutError) as e:  # SO_RCVTIMEO passed
            raise DataPlaneTimeout(f"no reply within {self.timeout_s:.3f}s") from e
        except OSError as e:
            raise DataPlaneError(f"data plane receive failed: {e}") from e

    def close(self) -> None:
        self.sock.close()
