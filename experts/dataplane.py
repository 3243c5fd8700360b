"""The dispatch data plane: gateway <-> expert pool bytes without Ray on the hot path.

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
import threading
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

_LEN = struct.Struct("<I")
_MESSAGE_MAX = 1 << 16  # bytes of one message on a same-node socket: a header, never tensor bytes
_HEADER_MAX = 1 << 12  # bytes of one TCP header (a few small fields)
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}  # what travels; the pool looks it up in DTYPES
_NONCE_BYTES = 32
_HMAC_CONTEXT = b"yuan-serve data plane v1"
_ACK = b"\x01"
SHM_DIR = "/dev/shm"  # where POSIX shared memory lives on Linux
_REGION_NAME = re.compile(r"^yuan-(\d+)-[0-9a-f]+$")


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
class _Framed:
    """A TCP socket's frames, both ways: length-prefixed headers, raw payloads. A read `recv`s what
    is there, so one system call usually brings a whole header (maybe the start of its payload too,
    kept for the payload read). Each end packs with its own `Packer`: `msgpack.packb` builds a new
    one per call. The pool's end reads under a deadline (`header(deadline_s)`): waiting for a header
    is unbounded, but once one has begun, it and its payload must arrive within the deadline."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buf, self._packer = sock, b"", msgpack.Packer()
        self._deadline: float | None = None  # monotonic time the message being read must be in by

    def send(self, header: dict | tuple, payload: list[memoryview] = ()) -> None:
        self.sock.sendall(_frame(self._packer.pack(header)))
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
        while len(self.buf) < _LEN.size:
            self.buf += self._recv(4096)
        size = _LEN.unpack_from(self.buf)[0]
        if size > _HEADER_MAX:
            raise HeaderError(f"header: {size} bytes, more than {_HEADER_MAX}")
        end = _LEN.size + size
        while len(self.buf) < end:
            self.buf += self._recv(max(4096, end - len(self.buf)))
        head, self.buf = msgpack.unpackb(self.buf[_LEN.size:end]), self.buf[end:]
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
    their names. Regions of live processes, and anything not named by `_Region`, are left alone."""
    swept = []
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return swept
    for name in names:
        m = _REGION_NAME.match(name)
        if m and not _pid_alive(int(m.group(1))):
            try:
                os.unlink(os.path.join(shm_dir, name))
                swept.append(name)
            except OSError:
                pass
    return swept


_live_regions: set[_Region] = set()  # unlinked at exit, whatever did not close them
_swept = False


class _Region:
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
        self.shm = shared_memory.SharedMemory(name=f"yuan-{os.getpid()}-{secrets.token_hex(6)}", create=True,
                                              size=max(1 << 16, 1 << (nbytes - 1).bit_length()))
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


class _Attached:
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


def _layout(n: int, d: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """Bytes of inline x `[n, d]`, expert ids `[n]` and weights `[n]`, laid out in that order."""
    return n * d * dtype.itemsize, n * 8, n * dtype.itemsize


def _batch_layout(t: int, a: int, d: int, dtype: torch.dtype) -> tuple[int, ...]:
    """Bytes of a shared batch's x `[T, d]`, its plan's index `[3, T*A]` and weights `[T*A]`, and the
    output slots `[T*A, d]`."""
    k = t * a
    return t * d * dtype.itemsize, 3 * k * 8, k * dtype.itemsize, k * d * dtype.itemsize


def _batch_views(buf: memoryview, t: int, a: int, d: int, dtype: torch.dtype) -> PairBatch:
    """x, plan index, plan weights and output slots of a shared batch, as views of `buf`."""
    (bx, bi, bw, bo), k = _batch_layout(t, a, d, dtype), t * a
    return PairBatch(_tensor(buf, 0, bx, (t, d), dtype), _tensor(buf, bx, bi, (3, k), torch.long).numpy(),
                     _tensor(buf, bx + bi, bw, (k,), dtype), _tensor(buf, bx + bi + bw, bo, (k, d), dtype))


def _raw(t: torch.Tensor) -> memoryview:
    """A tensor's bytes, as they travel (no copy when it is already contiguous)."""
    return memoryview(t.contiguous().view(torch.uint8).reshape(-1).numpy()) if t.numel() else memoryview(b"")


def _tensor(buf: memoryview, offset: int, nbytes: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset).view(shape)


# ---- pool side ----------------------------------------------------------------------------------
class DataPlaneServer:
    """Serves `compute` to gateways over a Unix socket and TCP; one thread per connection."""

    def __init__(self, compute: Compute, hidden: int, limits: DataPlaneLimits, tcp_host: str = "127.0.0.1") -> None:
        self.compute, self.hidden, self.limits = compute, hidden, limits
        self.key = secrets.token_bytes(32)  # handed to gateways through Ray, never on these sockets
        self.uds_path = f"\0yuan-dp-{os.getpid()}-{secrets.token_hex(8)}"  # abstract: no file to remove
        self._uds = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._uds.bind(self.uds_path)
        self._uds.listen(16)
        self._tcp = socket.create_server((tcp_host, 0))
        self.tcp_address = (tcp_host, self._tcp.getsockname()[1])
        self._lock = threading.Lock()  # one compute at a time, whichever gateway asks
        self._closed = False
        self._conns: set[socket.socket] = set()
        for listener, serve in ((self._uds, self._serve_shared), (self._tcp, self._serve_inline)):
            threading.Thread(target=self._accept, args=(listener, serve), daemon=True, name="dp-accept").start()

    def address(self) -> dict:
        """Where gateways reach this server and the key they prove themselves with (give it only
        through an authenticated channel: Ray)."""
        return {"uds": self.uds_path, "tcp": list(self.tcp_address), "key": self.key.hex()}

    def _accept(self, listener: socket.socket, serve: Callable[[socket.socket], None]) -> None:
        while not self._closed:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            if listener is self._tcp:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._connection, args=(conn, serve), daemon=True, name="dp-conn").start()

    def _connection(self, conn: socket.socket, serve: Callable[[socket.socket], None]) -> None:
        self._conns.add(conn)
        try:
            if self._authenticate(conn):
                serve(conn)
        finally:
            self._conns.discard(conn)
            conn.close()

    def _authenticate(self, conn: socket.socket) -> bool:
        """Nonce out, HMAC in, within the handshake deadline; nothing else is read before."""
        nonce = secrets.token_bytes(_NONCE_BYTES)
        try:
            conn.settimeout(self.limits.handshake_timeout_s)
            conn.sendall(nonce)
            mac = _recv_exact(conn, 32)
            if mac is None or not hmac.compare_digest(mac, handshake_mac(self.key, nonce)):
                return False
            conn.sendall(_ACK)
            conn.settimeout(None)
            return True
        except OSError:  # the deadline passed, or the peer went away
            return False

    def _serve_shared(self, conn: socket.socket) -> None:
        """A gateway on this node: one message per request and per reply (SOCK_SEQPACKET).
        A blocking `recv` on it wakes only for input, where a stream socket's also wakes (for
        nothing) each time the gateway reads this pool's reply and so frees send space."""
        theirs, packer = _Attached(), msgpack.Packer()
        batch: dict = {}  # the views of the gateway's batch region, kept while its name and shape hold
        try:
            while True:
                try:
                    message = conn.recv(_MESSAGE_MAX)
                    if not message:
                        return
                    req = self._check_shared(SharedRequest(*msgpack.unpackb(message)))
                except HeaderError as e:  # say which field, then end this connection
                    _send_quietly(conn, packer.pack({"error": str(e)}))
                    return
                except (OSError, ValueError, TypeError):
                    return
                try:
                    reply = (req.end - req.start, self._answer_shared(req, theirs, batch))
                except Exception as e:  # report the failure; the connection stays usable
                    reply = {"error": f"{type(e).__name__}: {e}"[:_MESSAGE_MAX // 2]}
                try:
                    conn.send(packer.pack(reply))
                except OSError:
                    return
        finally:
            batch.clear()
            theirs.close()

    def _serve_inline(self, conn: socket.socket) -> None:
        """A gateway on another node: framed headers, the rows and outputs on the socket (TCP)."""
        framed = _Framed(conn)
        while True:
            try:
                head = self._check_inline(framed.header(self.limits.payload_timeout_s))
            except HeaderError as e:
                _send_quietly(conn, _frame(msgpack.packb({"error": str(e)})))
                return
            except (DataPlaneError, OSError, ValueError, TypeError, KeyError):
                return
            try:
                self._answer_inline(framed, head)
            except (DataPlaneError, OSError):  # the payload did not arrive in time, or the peer left
                return
            except Exception as e:  # report the failure; the connection stays usable
                framed.send({"error": f"{type(e).__name__}: {e}"})
            framed.idle()

    # ---- header bounds (checked before any allocation) ----
    def _bounded(self, field: str, value, low: int, high: int) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise HeaderError(f"{field}: {value!r} is outside [{low}, {high}]")
        return value

    def _check_shared(self, req: SharedRequest) -> SharedRequest:
        lim = self.limits
        self._bounded("layer", req.layer, 0, lim.num_layers - 1)
        self._bounded("tokens", req.tokens, 1, lim.max_tokens)
        self._bounded("top_k", req.top_k, 1, lim.num_experts)
        self._bounded("start", req.start, 0, req.tokens * req.top_k)
        self._bounded("end", req.end, req.start, req.tokens * req.top_k)
        if req.dtype not in DTYPES:
            raise HeaderError(f"dtype: {req.dtype!r} is not one of {sorted(DTYPES)}")
        if req.region is not None and not (isinstance(req.region, str) and _REGION_NAME.match(req.region)):
            raise HeaderError(f"region: {req.region!r} is not a data-plane region name")
        return req

    def _check_inline(self, head) -> dict:
        lim = self.limits
        if not isinstance(head, dict) or set(head) != {"layer", "t", "dtype"}:
            raise HeaderError(f"header: expected the fields layer, t, dtype, got {head!r:.200}")
        self._bounded("layer", head["layer"], 0, lim.num_layers - 1)
        self._bounded("t", head["t"], 1, lim.max_tokens * lim.top_k)
        if head["dtype"] not in DTYPES:
            raise HeaderError(f"dtype: {head['dtype']!r} is not one of {sorted(DTYPES)}")
        return head

    def _compute(self, layer: int, batch: PairBatch, start: int, end: int) -> float:
        with self._lock:
            t0 = time.perf_counter()
            self.compute(layer, batch, start, end)
            return time.perf_counter() - t0

    def _answer_shared(self, req: SharedRequest, theirs: _Attached, batch: dict) -> float:
        """Compute this pool's span of the gateway's shared plan into the span's output slots;
        returns the seconds of expert math."""
        key = (req.tokens, req.top_k, req.dtype)
        if req.region is not None or batch.get("key") != key:
            batch.clear()  # drop old views first, so a renamed region can be unmapped
            buf = theirs.view(req.region)
            need = sum(_batch_layout(req.tokens, req.top_k, self.hidden, DTYPES[req.dtype]))
            if buf is None or len(buf) < need:
                raise ValueError(f"region: {0 if buf is None else len(buf)} bytes, the batch needs {need}")
            batch["views"] = _batch_views(buf, req.tokens, req.top_k, self.hidden, DTYPES[req.dtype])
            batch["key"] = key
        views = batch["views"]
        _check_span(views.index, req.start, req.end, req.tokens, req.top_k)
        return self._compute(req.layer, views, req.start, req.end)

    def _answer_inline(self, framed: _Framed, head: dict) -> None:
        n, d, dtype = head["t"], self.hidden, DTYPES[head["dtype"]]
        bx, bi, bw = _layout(n, d, dtype)
        buf = framed.exact(bx + bi + bw)
        pairs = np.arange(n)
        index = np.stack([pairs, pairs, _tensor(buf, bx, bi, (n,), torch.long).numpy()])  # one row per pair
        batch = PairBatch(_tensor(buf, 0, bx, (n, d), dtype), index, _tensor(buf, bx + bi, bw, (n,), dtype),
                          torch.empty(n, d, dtype=dtype))
        compute_s = self._compute(head["layer"], batch, 0, n)
        framed.send((n, compute_s), [_raw(batch.out)])

    def close(self) -> None:
        self._closed = True
        for sock in [self._uds, self._tcp] + list(self._conns):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


def _check_span(index: np.ndarray, start: int, end: int, tokens: int, top_k: int) -> None:
    """The plan's rows and slots of pairs [start, end) point inside the batch (numpy would wrap a
    negative one around to a real entry); expert ids are checked by the bank."""
    if end > start:
        span = index[:2, start:end]
        low, high = span.min(axis=1), span.max(axis=1)
        if low.min() < 0 or high[0] >= tokens or high[1] >= tokens * top_k:
            raise ValueError(f"plan: rows or slots of pairs [{start}, {end}) are outside the batch")


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    """n bytes from a stream socket (one message on a SOCK_SEQPACKET one); None if it closed first."""
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _frame(head: bytes) -> bytes:
    return _LEN.pack(len(head)) + head


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass


# ---- gateway side -------------------------------------------------------------------------------
class SharedBatch:
    """One lane's layer batch, dispatch plan and output slots in shared memory: written once per
    layer, mapped by every pool on this node, each of which fills its pairs' slots. Rewritten only
    after every reply to the previous write has come back."""

    def __init__(self) -> None:
        self.region = _Region()
        self.shape: tuple[int, int, int, torch.dtype] | None = None  # T, A, d, dtype of the batch laid out
        self.name = ""  # the region's name (it changes when the region grows), kept: read per request
        self._views: PairBatch | None = None

    def reserve(self, tokens: int, top_k: int, d: int, dtype: torch.dtype) -> tuple[np.ndarray, torch.Tensor]:
        """Room for a batch of this shape; returns where its plan's index `[3, T*A]` and weights
        `[T*A]` go, so `plan_dispatch` can build them in place."""
        shape = (tokens, top_k, d, dtype)
        if shape != self.shape:
            self._views = None  # let go of the old region's views before it may be unmapped
            self.region.ensure(max(1, sum(_batch_layout(*shape))))
            self.shape, self.name = shape, self.region.shm.name
            self._views = _batch_views(self.region.shm.buf, *shape)
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
        self._prove(bytes.fromhex(address["key"]))
        self._framed = None if same_node else _Framed(self.sock)  # inline requests
        self._packer = msgpack.Packer()  # shared requests: a message is one packed header
        self._batch_name: str | None = None  # the shared batch region the pool last heard of
        self._pending: tuple | None = None  # the awaited inline reply's (d, dtype)
        self.last_compute_s = 0.0  # the pool's own time for the last request's expert math

    def _prove(self, key: bytes) -> None:
        """Answer the pool's nonce with its HMAC; the pool acknowledges, or closes on a wrong key."""
        try:
            nonce = _recv_exact(self.sock, _NONCE_BYTES)
            if nonce is None:
                raise DataPlaneError("data plane closed before its handshake")
            self.sock.sendall(handshake_mac(key, nonce))
            if self.sock.recv(1) != _ACK:
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
            req = SharedRequest(layer, t, a, start, end, _DTYPE_NAMES[dtype], region)
            self.sock.send(self._packer.pack(req))
        except OSError as e:
            raise DataPlaneError(f"data plane send failed: {e}") from e
        self._batch_name = batch.name

    def send(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
             rows: torch.Tensor | None = None) -> None:
        """Send rows `rows` of x (all rows if None), one pair each, with its expert id and weight `[n]`."""
        xs = x if rows is None else x.index_select(0, rows)
        head = {"layer": layer, "t": xs.shape[0], "dtype": _DTYPE_NAMES[x.dtype]}
        try:
            self._framed.send(head, [_raw(t) for t in (xs, expert_ids, weights)])
        except OSError as e:
            raise DataPlaneError(f"data plane send failed: {e}") from e
        self._pending = (x.shape[1], x.dtype)

    def recv(self) -> torch.Tensor | None:
        """Wait for the last request's reply: a shared request's outputs are in the batch's slots
        (None), an inline request's come from the socket `[n, d]`, valid until the next request."""
        try:
            if self.shared:
                message = self.sock.recv(_MESSAGE_MAX)
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
            return _tensor(self._framed.exact(nbytes), 0, nbytes, (n, d), dtype)
        except DataPlaneError:
            raise
        except OSError as e:
            raise DataPlaneError(f"data plane receive failed: {e}") from e

    def close(self) -> None:
        self.sock.close()
