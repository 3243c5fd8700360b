"""The dispatch data plane: gateway <-> expert pool bytes without Ray on the hot path.

Ray still places, starts, supervises and restarts the pools; only the per-layer bytes take this road.
A pool opens a server (`DataPlaneServer`) from inside its actor: a Unix socket for gateways on the
same node, TCP for the others. Each message is a length-prefixed msgpack header; tensor bytes follow
raw, either in shared memory (same node: the writer owns its region, grows it as needed and names it
in the header) or inline on the socket (across nodes). Measured here: 0.03 ms for a 128 KiB round
trip through shared memory and a Unix socket, against about 7 ms per pool for a Ray actor call.

Request payload: x `[n, d]` | expert ids `[n, A]` int64 | weights `[n, A]`; reply payload: `[n, d]`.
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
    return n * d * dtype.itemsize, n * a * 8, n * a * dtype.itemsize


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
                    self._answer(conn, head, mine, theirs)
                except Exception as e:  # report the failure; the connection stays usable
                    _send(conn, {"ok": False, "error": f"{type(e).__name__}: {e}"})
        finally:
            mine.close()
            theirs.close()
            conn.close()

    def _answer(self, conn: socket.socket, head: dict, mine: _Region, theirs: _Attached) -> None:
        n, a, d, dtype = head["n"], head["a"], self.hidden, DTYPES[head["dtype"]]
        bx, bi, bw = _layout(n, a, d, dtype)
        if head["inline"]:
            buf = _recv_exact(conn, bx + bi + bw)
        else:
            buf = theirs.view(head.get("shm"))
        x = _tensor(buf, 0, bx, (n, d), dtype)
        ids = _tensor(buf, bx, bi, (n, a), torch.long)
        w = _tensor(buf, bx + bi, bw, (n, a), dtype)
        with self._lock:
            t0 = time.perf_counter()
            out = self.compute(head["layer"], x, ids, w).contiguous()
            compute_s = time.perf_counter() - t0
        raw = _raw(out)
        if head["inline"]:
            _send(conn, {"ok": True, "inline": True, "compute_s": compute_s}, [raw])
            return
        renamed = mine.ensure(max(1, raw.nbytes))
        mine.shm.buf[: raw.nbytes] = raw
        _send(conn, {"ok": True, "inline": False, "shm": renamed, "compute_s": compute_s})

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
class PoolChannel:
    """The gateway's connection to one pool: `send` a layer's request, then `recv` its partial sums."""

    def __init__(self, address: dict, same_node: bool, timeout_s: float = 60.0) -> None:
        self.inline = not same_node
        if same_node:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout_s)
            self.sock.connect(address["uds"])
        else:
            self.sock = socket.create_connection(tuple(address["tcp"]), timeout=timeout_s)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.mine, self.theirs = _Region(), _Attached()
        self._pending: tuple[tuple[int, int], torch.dtype] | None = None  # shape and dtype of the reply
        self.last_compute_s = 0.0  # the pool's own time for the last request's expert math

    def send(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
             rows: torch.Tensor | None = None) -> None:
        """Send rows `rows` of x (all rows if None) with their expert ids and weights `[n, A]`."""
        n, d, a = expert_ids.shape[0], x.shape[1], expert_ids.shape[1]
        head = {"layer": layer, "n": n, "a": a, "dtype": str(x.dtype).removeprefix("torch."), "inline": self.inline}
        try:
            if self.inline:
                xs = x if rows is None else x[rows]
                _send(self.sock, head, [_raw(t) for t in (xs, expert_ids, weights)])
            else:  # write straight into our shared region: one copy, gathered in place
                bx, bi, bw = _layout(n, a, d, x.dtype)
                head["shm"] = self.mine.ensure(max(1, bx + bi + bw))
                buf = self.mine.shm.buf
                if n:
                    out = _tensor(buf, 0, bx, (n, d), x.dtype)
                    torch.index_select(x, 0, rows, out=out) if rows is not None else out.copy_(x)
                    _tensor(buf, bx, bi, (n, a), torch.long).copy_(expert_ids)
                    _tensor(buf, bx + bi, bw, (n, a), x.dtype).copy_(weights)
                _send(self.sock, head)
        except OSError as e:
            raise DataPlaneError(f"data plane send failed: {e}") from e
        self._pending = ((n, d), x.dtype)

    def recv(self) -> torch.Tensor:
        """The partial sums `[n, d]` of the last `send`; valid until the next `send`."""
        (n, d), dtype = self._pending
        try:
            head = _recv(self.sock)
            if not head["ok"]:
                raise DataPlaneError(f"pool failed: {head['error']}")
            self.last_compute_s = head.get("compute_s", 0.0)
            nbytes = n * d * dtype.itemsize
            buf = _recv_exact(self.sock, nbytes) if head["inline"] else self.theirs.view(head.get("shm"))
        except OSError as e:
            raise DataPlaneError(f"data plane receive failed: {e}") from e
        return _tensor(buf, 0, nbytes, (n, d), dtype)

    def close(self) -> None:
        self.sock.close()
        self.mine.close()
        self.theirs.close()
