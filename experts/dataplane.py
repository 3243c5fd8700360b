"""The dispatch data plane: gateway <-> expert pool bytes without Ray on the hot path.

Ray still places, starts, supervises and restarts the pools; only the per-layer bytes take this road.
A pool opens a server (`DataPlaneServer`) from inside its actor: a Unix socket for gateways on the
same node, TCP for the others. Each message is a length-prefixed msgpack header; tensor bytes follow
raw, either in shared memory (same node: the writer owns its region, grows it as needed and names it
in the header) or inline on the socket (across nodes). Measured here: 0.03 ms for a 128 KiB round
trip through shared memory and a Unix socket, against about 7 ms per pool for a Ray actor call.

Same node ("shared"): the gateway writes a layer's whole batch once into one region per lane that
every pool on the node reads, x `[T, d]` | expert ids `[T, A]` int64 | weights `[T, A]` | the worker
of each pair `[T, A]` int64, and sends each pool only a header naming its worker index; the pool cuts
its own rows (`router.plan.worker_request`) and replies rows `[n]` int64 | partial sums `[n, d]` in its
region. Other nodes ("inline"): the gateway cuts the rows and sends x `[n, d]` | ids `[n, A]` |
weights `[n, A]` on the socket; the reply is the partial sums `[n, d]` on the socket.
"""

from __future__ import annotations

import os
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from multiprocessing import resource_tracker, shared_memory

import msgpack
import torch

from model.config import DTYPES
from router.plan import worker_request

_LEN = struct.Struct("<I")
Compute = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class DataPlaneError(ConnectionError):
    """The data plane to a pool failed; callers fall back to Ray calls."""


# ---- framing ------------------------------------------------------------------------------------
def _send(sock: socket.socket, header: dict, payload: list[memoryview] = ()) -> None:
    head = msgpack.packb(header)
    sock.sendall(_LEN.pack(len(head)) + head)
    for part in payload:
        sock.sendall(part)


def _recv_exact(sock: socket.socket, n: int, into: memoryview | None = None) -> memoryview:
    buf = into if into is not None else memoryview(bytearray(n))
    got = 0
    while got < n:
        k = sock.recv_into(buf[got:n], n - got)
        if k == 0:
            raise DataPlaneError("data plane connection closed")
        got += k
    return buf


def _recv(sock: socket.socket) -> dict:
    (n,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    return msgpack.unpackb(_recv_exact(sock, n))


class _Region:
    """A shared-memory region owned by one side; grows by doubling and gets a new name when it does."""

    def __init__(self) -> None:
        self.shm: shared_memory.SharedMemory | None = None

    def ensure(self, nbytes: int) -> str | None:
        """Make room; returns the new name if the region was (re)created."""
        if self.shm is not None and self.shm.size >= nbytes:
            return None
        self.close()
        self.shm = shared_memory.SharedMemory(create=True, size=max(1 << 16, 1 << (nbytes - 1).bit_length()))
        return self.shm.name

    def close(self) -> None:
        if self.shm is not None:
            _unmap(self.shm)
            self.shm.unlink()
            self.shm = None


def _unmap(shm: shared_memory.SharedMemory) -> None:
    try:
        shm.close()
    except BufferError:  # a tensor still views it; the mapping goes with that tensor
        pass


class _Attached:
    """The peer's region, re-attached whenever the peer names a new one."""

    def __init__(self) -> None:
        self.shm: shared_memory.SharedMemory | None = None

    def view(self, name: str | None) -> memoryview:
        if name is not None:
            self.close()
            self.shm = shared_memory.SharedMemory(name=name)
            # The owner unlinks it; keep this process's resource tracker from doing so too.
            resource_tracker.unregister(self.shm._name, "shared_memory")
        return self.shm.buf

    def close(self) -> None:
        if self.shm is not None:
            _unmap(self.shm)
            self.shm = None


def _layout(n: int, a: int, d: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """Bytes of x `[n, d]`, expert ids `[n, A]` and weights `[n, A]`, laid out in that order."""
    return n * d * dtype.itemsize, n * a * 8, n * a * dtype.itemsize


def _batch_views(buf: memoryview, t: int, a: int, d: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """x, expert ids, weights and pair workers of a shared batch, as views of `buf`."""
    bx, bi, bw = _layout(t, a, d, dtype)
    return (_tensor(buf, 0, bx, (t, d), dtype), _tensor(buf, bx, bi, (t, a), torch.long),
            _tensor(buf, bx + bi, bw, (t, a), dtype), _tensor(buf, bx + bi + bw, bi, (t, a), torch.long))


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

    def __init__(self, compute: Compute, hidden: int, tcp_host: str = "127.0.0.1") -> None:
        self.compute, self.hidden = compute, hidden
        self.dir = tempfile.mkdtemp(prefix="yuan-dp-")
        self.uds_path = os.path.join(self.dir, "pool.sock")
        self._uds = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._uds.bind(self.uds_path)
        self._uds.listen(16)
        self._tcp = socket.create_server((tcp_host, 0))
        self.tcp_address = (tcp_host, self._tcp.getsockname()[1])
        self._lock = threading.Lock()  # one compute at a time, whichever gateway asks
        self._closed = False
        for listener in (self._uds, self._tcp):
            threading.Thread(target=self._accept, args=(listener,), daemon=True, name="dp-accept").start()

    def address(self) -> dict:
        return {"uds": self.uds_path, "tcp": list(self.tcp_address)}

    def _accept(self, listener: socket.socket) -> None:
        while not self._closed:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            if conn.family != socket.AF_UNIX:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(conn,), daemon=True, name="dp-conn").start()

    def _serve(self, conn: socket.socket) -> None:
        mine, theirs = _Region(), _Attached()
        try:
            while True:
                try:
                    head = _recv(conn)
                except (DataPlaneError, OSError):
                    return
                try:
                    if head["shared"]:
                        self._answer_shared(conn, head, mine, theirs)
                    else:
                        self._answer_inline(conn, head)
                except Exception as e:  # report the failure; the connection stays usable
                    _send(conn, {"ok": False, "error": f"{type(e).__name__}: {e}"})
        finally:
            mine.close()
            theirs.close()
            conn.close()

    def _compute(self, layer: int, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, float]:
        with self._lock:
            t0 = time.perf_counter()
            out = self.compute(layer, x, ids, w)
            return out, time.perf_counter() - t0

    def _answer_shared(self, conn: socket.socket, head: dict, mine: _Region, theirs: _Attached) -> None:
        """Cut this pool's rows out of the gateway's shared batch; reply rows and sums in our region."""
        dtype = DTYPES[head["dtype"]]
        x, ids, w, pair_worker = _batch_views(theirs.view(head.get("shm")), head["t"], head["a"], self.hidden, dtype)
        r = worker_request(head["me"], pair_worker, ids, w)
        out, compute_s = self._compute(head["layer"], x.index_select(0, r.rows), r.expert_ids, r.weights)
        n, br = r.rows.numel(), r.rows.numel() * 8
        renamed = mine.ensure(max(1, br + out.numel() * dtype.itemsize))
        if n:
            _tensor(mine.shm.buf, 0, br, (n,), torch.long).copy_(r.rows)
            _tensor(mine.shm.buf, br, out.numel() * dtype.itemsize, tuple(out.shape), dtype).copy_(out)
        _send(conn, {"ok": True, "n": n, "shm": renamed, "compute_s": compute_s})

    def _answer_inline(self, conn: socket.socket, head: dict) -> None:
        n, a, d, dtype = head["t"], head["a"], self.hidden, DTYPES[head["dtype"]]
        bx, bi, bw = _layout(n, a, d, dtype)
        buf = _recv_exact(conn, bx + bi + bw)
        x, ids = _tensor(buf, 0, bx, (n, d), dtype), _tensor(buf, bx, bi, (n, a), torch.long)
        out, compute_s = self._compute(head["layer"], x, ids, _tensor(buf, bx + bi, bw, (n, a), dtype))
        _send(conn, {"ok": True, "n": n, "compute_s": compute_s}, [_raw(out)])

    def close(self) -> None:
        self._closed = True
        for listener in (self._uds, self._tcp):
            listener.close()
        try:
            os.unlink(self.uds_path)
            os.rmdir(self.dir)
        except OSError:
            pass


# ---- gateway side -------------------------------------------------------------------------------
class SharedBatch:
    """One lane's layer batch in shared memory: written once per layer, read by every pool on this
    node. Rewritten only after every reply to the previous write has come back."""

    def __init__(self) -> None:
        self.region = _Region()
        self.name: str | None = None
        self.shape: tuple[int, int, int, torch.dtype] | None = None  # T, A, d, dtype of the last write

    def write(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
              pair_worker: torch.Tensor) -> None:
        (t, d), a = x.shape, expert_ids.shape[1]
        bx, bi, bw = _layout(t, a, d, x.dtype)
        if self.region.ensure(max(1, bx + 2 * bi + bw)) is not None:
            self.name = self.region.shm.name
        for view, src in zip(_batch_views(self.region.shm.buf, t, a, d, x.dtype), (x, expert_ids, weights, pair_worker)):
            view.copy_(src)
        self.shape = (t, a, d, x.dtype)

    def close(self) -> None:
        self.region.close()


class PoolChannel:
    """The gateway's connection to one pool: send a layer's request, then `recv` its partial sums.
    On the pool's node requests go as `send_shared` (a header; the batch is in shared memory),
    elsewhere as `send` (the rows on the socket)."""

    def __init__(self, address: dict, same_node: bool, timeout_s: float = 60.0) -> None:
        self.shared = same_node
        if same_node:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout_s)
            self.sock.connect(address["uds"])
        else:
            self.sock = socket.create_connection(tuple(address["tcp"]), timeout=timeout_s)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.theirs = _Attached()
        self._batch_name: str | None = None  # the shared batch region the pool last heard of
        self._pending: tuple[torch.Tensor | None, int, torch.dtype] | None = None  # rows sent, d, dtype
        self.last_compute_s = 0.0  # the pool's own time for the last request's expert math

    def send_shared(self, layer: int, worker: int, batch: SharedBatch) -> None:
        """Ask the pool for worker `worker`'s share of the batch last written to `batch`."""
        t, a, d, dtype = batch.shape
        head = {"layer": layer, "t": t, "a": a, "dtype": _dtype_name(dtype), "shared": True, "me": worker,
                "shm": batch.name if batch.name != self._batch_name else None}
        self._request(head, [], (None, d, dtype))
        self._batch_name = batch.name

    def send(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
             rows: torch.Tensor | None = None) -> None:
        """Send rows `rows` of x (all rows if None) with their expert ids and weights `[n, A]`."""
        xs = x if rows is None else x.index_select(0, rows)
        head = {"layer": layer, "t": xs.shape[0], "a": expert_ids.shape[1], "dtype": _dtype_name(x.dtype),
                "shared": False}
        rows = torch.arange(xs.shape[0]) if rows is None else rows
        self._request(head, [_raw(t) for t in (xs, expert_ids, weights)], (rows, x.shape[1], x.dtype))

    def _request(self, head: dict, payload: list[memoryview], pending: tuple) -> None:
        try:
            _send(self.sock, head, payload)
        except OSError as e:
            raise DataPlaneError(f"data plane send failed: {e}") from e
        self._pending = pending

    def recv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows `[n]` and partial sums `[n, d]` of the last request; views valid until the next."""
        rows, d, dtype = self._pending
        try:
            head = _recv(self.sock)
            if not head["ok"]:
                raise DataPlaneError(f"pool failed: {head['error']}")
            self.last_compute_s = head["compute_s"]
            n = head["n"]
            nbytes = n * d * dtype.itemsize
            if rows is not None:
                return rows, _tensor(_recv_exact(self.sock, nbytes), 0, nbytes, (n, d), dtype)
            buf = self.theirs.view(head["shm"])
        except OSError as e:
            raise DataPlaneError(f"data plane receive failed: {e}") from e
        return _tensor(buf, 0, n * 8, (n,), torch.long), _tensor(buf, n * 8, nbytes, (n, d), dtype)

    def close(self) -> None:
        self.sock.close()
        self.theirs.close()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
