"""The data plane's wire format, shared by both ends (pools in `experts/dataplane.py`, gateways in
`gateway/channel.py`): the handshake, the request header and its bounds, TCP framing, the shared
batch's layout in a region, and the regions themselves.

Ray still places, starts, supervises and restarts the pools; only the per-layer bytes take this road.
A pool opens a server (`DataPlaneServer`) from inside its actor: a Unix socket for gateways on the
same node, TCP for the others. Headers are msgpack (on the hot path arrays: a `SharedRequest`, the
reply `[n, compute_s]`; an error is a map). On the Unix socket (SOCK_SEQPACKET) each header is one
message and the tensor bytes are in shared memory (one region per gateway lane, owned by the
gateway, which names it in a header whenever it grows); on TCP headers are length-prefixed and the
tensor bytes follow raw. Measured here: 0.03 ms for a 128 KiB round trip through shared memory and
a Unix socket, against about 7 ms per pool for a Ray actor call.

Every connection proves it belongs to the deployment before the pool reads anything else: the pool
sends a random nonce, the gateway answers HMAC-SHA256(key, nonce) with the pool's key (made by the
pool, handed to gateways through Ray with its address), and the pool acknowledges with one byte or
closes; a peer that stays silent is dropped after `handshake_timeout_s`. Every header field is
bounded by what the pool is configured for (`DataPlaneLimits`: layers, experts, rows per request,
dtypes) before anything is allocated; a header out of bounds gets an error naming the field and
the connection is closed; a TCP payload that does not arrive within `payload_timeout_s` drops the
connection. The Unix socket lives in the abstract namespace (no file to leave behind), and shared
regions are named `yuan-<pid>-...`, so those of a dead process are swept at the next start.


Same node ("shared"): the gateway writes a layer's batch and its dispatch plan (`router.plan`) once
into one region per lane that every pool on the node maps: x `[T, d]` | the plan's index `[3, T*A]`
int64 (token rows, output slots, expert ids) | weights `[T*A]` | outputs `[T*A, d]`, and sends each
pool only a header with its span of the plan; the pool reads its rows of x in place and writes each
pair's output into its slot of the outputs, then replies a header; once all replies are in, the
gateway adds each token's slots (`sum_slots`). Other nodes ("inline"): the gateway gathers the rows
and sends x `[n, d]` | ids `[n]` | weights `[n]` on the socket; the outputs `[n, d]` come back on it.
"""

from __future__ import annotations

import atexit
import hashlib
import hmac
import os
import re
import secrets
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from multiprocessing import resource_tracker, shared_memory
from typing import NamedTuple

import msgpack
import numpy as np
import torch

from model.config import DTYPES
from model.experts import bits

LEN = struct.Struct("<I")
MESSAGE_MAX = 1 << 16  # bytes of one message on a same-node socket: a header, never tensor bytes
HEADER_MAX = 1 << 12  # bytes of one TCP header (a few small fields)
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}  # what travels; the pool looks it up in DTYPES
NONCE_BYTES = 32
_HMAC_CONTEXT = b"yuan-serve data plane v1"
ACK = b"\x01"
SHM_DIR = "/dev/shm"  # where POSIX shared memory lives on Linux
REGION_NAME = re.compile(r"^yuan-(\d+)-[0-9a-f]+$")


@dataclass(frozen=True)
class DataPlaneLimits:
    """What a pool accepts on its data plane; a header outside these is refused before any allocation."""

    num_layers: int  # layer must be in [0, num_layers)
    num_experts: int  # top_k at most this
    max_tokens: int = 16384  # rows of x per request (tokens on the same node; pairs / top_k inline)
    top_k: int = 2  # inline requests carry at most max_tokens * top_k pairs
    handshake_timeout_s: float = 5.0  # a connection must authenticate within this
    payload_timeout_s: float = 10.0  # a TCP header's payload must arrive within this


def handshake_mac(key: bytes, nonce: bytes) -> bytes:
    return hmac.new(key, _HMAC_CONTEXT + nonce, hashlib.sha256).digest()


class HeaderError(ValueError):
    """A header field outside the pool's limits (the message starts with the field)."""


@dataclass
class PairBatch:
    """A batch of routed pairs as a pool computes it: on the gateway's node, views of its shared
    batch, kept while the batch keeps its region and shape; from elsewhere, the socket's rows."""

    x: torch.Tensor  # [T, d] token rows
    index: np.ndarray  # [3, K] int64 per pair: its token row, its output slot, its expert id
    weights: torch.Tensor  # [K] routing weights
    out: torch.Tensor  # [T*A, d] output slots

    @cached_property
    def x_bits(self) -> np.ndarray:
        """x as raw same-size integers (`model.experts.bits`), made once: for moving rows in numpy
        without two torch ops per call."""
        return bits(self.x)

    @cached_property
    def out_bits(self) -> np.ndarray:
        """The output slots as raw same-size integers, made once (as `x_bits`)."""
        return bits(self.out)


# (layer, batch, start, end): out[slots[i]] = weights[i] * expert ids[i](x[rows[i]]) for pairs i in
# [start, end). Spans, not sliced tensors: a pool resumes cold each layer, and slicing five torch
# tensors cost it ~20 us of the ~100 it spends per layer; numpy slices of the index cost ~1 us.
Compute = Callable[[int, PairBatch, int, int], None]


class DataPlaneError(ConnectionError):
    """The data plane to a pool failed; callers fall back to Ray calls."""


class DataPlaneTimeout(DataPlaneError):
    """A pool's reply did not come within its deadline (the connection itself may still be good)."""


class SharedRequest(NamedTuple):
    """Compute pairs [start, end) of the plan in the gateway's shared batch (sent as a msgpack array:
    no keys to pack, unpack and look up on the per-layer path)."""

    layer: int
    tokens: int  # T
    top_k: int  # A: the plan has (up to) T*A pairs, the outputs T*A slots
    start: int
    end: int
    dtype: str
    region: str | None  # the batch region's name, sent when it is new to this pool


# ---- framing ------------------------------------------------------------------------------------
class Framed:
    """A TCP socket's frames, both ways: length-prefixed headers, raw payloads. A read `recv`s what
    is there, so one system call usually brings a whole header (maybe the start of its payload too,
    kept for the payload read). Each end packs with its own `Packer`: `msgpack.packb` builds a new
    one per call. The pool's end reads under a deadline (`header(deadline_s)`): waiting for a header
    is unbounded, but once one has begun, it and its payload must arrive within the deadline."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buf, self._packer = sock, b"", msgpack.Packer()
        self._deadline: float | None = None  # monotonic time the message being read must be in by

    def send(self, header: dict | tuple, payload: list[memoryview] = ()) -> None:
        self.sock.sendall(frame(self._packer.pack(header)))
        for part in payload:
            self.sock.sendall(part)

    def _arm(self) -> None:
        """Before a read under a deadline: the socket times out when the deadline does."""
        if self._deadline is not None:
            left = self._deadline - time.monotonic()
            if left <= 0:
                raise DataPlaneError("data plane message did not arrive in time")
            self.sock.settimeout(left)

    def _recv(self, n: int) -> bytes:
        self._arm()
        chunk = self.sock.recv(n)
        if not chunk:
            raise DataPlaneError("data plane connection closed")
        return chunk

    def header(self, deadline_s: float | None = None) -> dict | list:
        if not self.buf:
            self.buf = self._recv(4096)  # the wait for a request: no deadline yet
        if deadline_s is not None:
            self._deadline = time.monotonic() + deadline_s
        while len(self.buf) < LEN.size:
            self.buf += self._recv(4096)
        size = LEN.unpack_from(self.buf)[0]
        if size > HEADER_MAX:
            raise HeaderError(f"header: {size} bytes, more than {HEADER_MAX}")
        end = LEN.size + size
        while len(self.buf) < end:
            self.buf += self._recv(max(4096, end - len(self.buf)))
        head, self.buf = msgpack.unpackb(self.buf[LEN.size : end]), self.buf[end:]
        return head

    def idle(self) -> None:
        """Between requests: wait for the next one without a deadline."""
        if self._deadline is not None:
            self._deadline = None
            self.sock.settimeout(None)

    def exact(self, n: int) -> memoryview:
        """The next n payload bytes."""
        out = memoryview(bytearray(n))
        got = min(n, len(self.buf))
        out[:got], self.buf = self.buf[:got], self.buf[got:]
        while got < n:
            self._arm()
            k = self.sock.recv_into(out[got:], n - got)
            if k == 0:
                raise DataPlaneError("data plane connection closed")
            got += k
        return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def sweep_dead_regions(shm_dir: str = SHM_DIR) -> list[str]:
    """Unlink the shared regions of processes that are gone (killed before they could); returns
    their names. Regions of live processes, and anything not named by `Region`, are left alone."""
    swept = []
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return swept
    for name in names:
        m = REGION_NAME.match(name)
        if m and not _pid_alive(int(m.group(1))):
            try:
                os.unlink(os.path.join(shm_dir, name))
                swept.append(name)
            except OSError:
                pass
    return swept


_live_regions: set[Region] = set()  # unlinked at exit, whatever did not close them
_swept = False


class Region:
    """A shared-memory region owned by one side; grows by doubling and gets a new name when it does.
    Named `yuan-<pid>-<random>`: the first region a process makes sweeps those of dead processes."""

    def __init__(self) -> None:
        self.shm: shared_memory.SharedMemory | None = None

    def ensure(self, nbytes: int) -> None:
        """Make room for `nbytes` (a new region, under a new name, when it must grow)."""
        global _swept
        if self.shm is not None and self.shm.size >= nbytes:
            return
        self.close()
        if not _swept:
            sweep_dead_regions()
            _swept = True
        self.shm = shared_memory.SharedMemory(
            name=f"yuan-{os.getpid()}-{secrets.token_hex(6)}",
            create=True,
            size=max(1 << 16, 1 << (nbytes - 1).bit_length()),
        )
        _live_regions.add(self)

    def close(self) -> None:
        if self.shm is not None:
            _unmap(self.shm)
            try:
                self.shm.unlink()
            except FileNotFoundError:
                pass
            self.shm = None
        _live_regions.discard(self)


@atexit.register
def _close_live_regions() -> None:
    for region in list(_live_regions):
        region.close()


def _unmap(shm: shared_memory.SharedMemory) -> None:
    try:
        shm.close()
    except BufferError:  # a tensor still views it; the mapping goes with that tensor
        pass


class Attached:
    """The peer's region, re-attached whenever the peer names a new one."""

    def __init__(self) -> None:
        self.shm: shared_memory.SharedMemory | None = None

    def view(self, name: str | None) -> memoryview | None:
        if name is not None:
            self.close()
            self.shm = shared_memory.SharedMemory(name=name)
            # The owner unlinks it; keep this process's resource tracker from doing so too.
            resource_tracker.unregister(self.shm._name, "shared_memory")
        return self.shm.buf if self.shm is not None else None

    def close(self) -> None:
        if self.shm is not None:
            _unmap(self.shm)
            self.shm = None


def inline_layout(n: int, d: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """Bytes of inline x `[n, d]`, expert ids `[n]` and weights `[n]`, laid out in that order."""
    return n * d * dtype.itemsize, n * 8, n * dtype.itemsize


def batch_layout(t: int, a: int, d: int, dtype: torch.dtype) -> tuple[int, ...]:
    """Bytes of a shared batch's x `[T, d]`, its plan's index `[3, T*A]` and weights `[T*A]`, and the
    output slots `[T*A, d]`."""
    k = t * a
    return t * d * dtype.itemsize, 3 * k * 8, k * dtype.itemsize, k * d * dtype.itemsize


def batch_views(buf: memoryview, t: int, a: int, d: int, dtype: torch.dtype) -> PairBatch:
    """x, plan index, plan weights and output slots of a shared batch, as views of `buf`."""
    (bx, bi, bw, bo), k = batch_layout(t, a, d, dtype), t * a
    return PairBatch(
        tensor_at(buf, 0, bx, (t, d), dtype),
        tensor_at(buf, bx, bi, (3, k), torch.long).numpy(),
        tensor_at(buf, bx + bi, bw, (k,), dtype),
        tensor_at(buf, bx + bi + bw, bo, (k, d), dtype),
    )


def raw_bytes(t: torch.Tensor) -> memoryview:
    """A tensor's bytes, as they travel (no copy when it is already contiguous)."""
    return memoryview(t.contiguous().view(torch.uint8).reshape(-1).numpy()) if t.numel() else memoryview(b"")


def tensor_at(
    buf: memoryview, offset: int, nbytes: int, shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset).view(shape)


def check_span(index: np.ndarray, start: int, end: int, tokens: int, top_k: int, num_experts: int) -> None:
    """The plan's rows, slots and expert ids of pairs [start, end) point inside the batch and the
    model (numpy and torch would wrap a -1 around to a real entry): two numpy calls."""
    if end > start:
        span = index[:, start:end]
        (row_lo, slot_lo, id_lo), (row_hi, slot_hi, id_hi) = (
            span.min(axis=1).tolist(),
            span.max(axis=1).tolist(),
        )
        if min(row_lo, slot_lo) < 0 or row_hi >= tokens or slot_hi >= tokens * top_k:
            raise ValueError(f"plan: rows or slots of pairs [{start}, {end}) are outside the batch")
        if id_lo < 0 or id_hi >= num_experts:
            raise ValueError(f"expert_ids: of pairs [{start}, {end}) are outside [0, {num_experts})")


def recv_exact(sock: socket.socket, n: int) -> bytes | None:
    """n bytes from a stream socket (one message on a SOCK_SEQPACKET one); None if it closed first."""
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def frame(head: bytes) -> bytes:
    return LEN.pack(len(head)) + head


def send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass
