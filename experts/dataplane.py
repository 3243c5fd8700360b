"""The pool's end of the data plane: `DataPlaneServer` serves `compute` to gateways over an abstract
Unix socket (same node: headers only, the bytes in the gateway's shared batch) and TCP (other nodes:
the rows on the socket). The wire format, the handshake and the header bounds are in
`router/dataplane.py`.
"""

from __future__ import annotations

import hmac
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable

import msgpack
import numpy as np
import torch

from model.config import DTYPES
from router.dataplane import (
    ACK,
    MESSAGE_MAX,
    NONCE_BYTES,
    REGION_NAME,
    Attached,
    Compute,
    DataPlaneError,
    DataPlaneLimits,
    Framed,
    HeaderError,
    PairBatch,
    SharedRequest,
    batch_layout,
    batch_views,
    check_span,
    frame,
    handshake_mac,
    inline_layout,
    raw_bytes,
    recv_exact,
    send_quietly,
    tensor_at,
)


class DataPlaneServer:
    """Serves `compute` to gateways over a Unix socket and TCP; one thread per connection."""

    def __init__(
        self, compute: Compute, hidden: int, limits: DataPlaneLimits, tcp_host: str = "127.0.0.1"
    ) -> None:
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
            threading.Thread(
                target=self._accept, args=(listener, serve), daemon=True, name="dp-accept"
            ).start()

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
        nonce = secrets.token_bytes(NONCE_BYTES)
        try:
            conn.settimeout(self.limits.handshake_timeout_s)
            conn.sendall(nonce)
            mac = recv_exact(conn, 32)
            if mac is None or not hmac.compare_digest(mac, handshake_mac(self.key, nonce)):
                return False
            conn.sendall(ACK)
            conn.settimeout(None)
            return True
        except OSError:  # the deadline passed, or the peer went away
            return False

    def _serve_shared(self, conn: socket.socket) -> None:
        """A gateway on this node: one message per request and per reply (SOCK_SEQPACKET).
        A blocking `recv` on it wakes only for input, where a stream socket's also wakes (for
        nothing) each time the gateway reads this pool's reply and so frees send space."""
        theirs, packer = Attached(), msgpack.Packer()
        batch: dict = {}  # the views of the gateway's batch region, kept while its name and shape hold
        try:
            while True:
                try:
                    message = conn.recv(MESSAGE_MAX)
                    if not message:
                        return
                    req = self._check_shared(SharedRequest(*msgpack.unpackb(message)))
                except HeaderError as e:  # say which field, then end this connection
                    send_quietly(conn, packer.pack({"error": str(e)}))
                    return
                except (OSError, ValueError, TypeError):
                    return
                try:
                    reply = (req.end - req.start, self._answer_shared(req, theirs, batch))
                except Exception as e:  # report the failure; the connection stays usable
                    reply = {"error": f"{type(e).__name__}: {e}"[: MESSAGE_MAX // 2]}
                try:
                    conn.send(packer.pack(reply))
                except OSError:
                    return
        finally:
            batch.clear()
            theirs.close()

    def _serve_inline(self, conn: socket.socket) -> None:
        """A gateway on another node: framed headers, the rows and outputs on the socket (TCP)."""
        framed = Framed(conn)
        while True:
            try:
                head = self._check_inline(framed.header(self.limits.payload_timeout_s))
            except HeaderError as e:
                send_quietly(conn, frame(msgpack.packb({"error": str(e)})))
                return
            except (DataPlaneError, OSError, ValueError, TypeError, KeyError):
                return
            try:
                self._answer_inline(framed, head)
            except (DataPlaneError, OSError):  # the payload did not arrive in time, or the peer left
                return
            except Exception as e:  # report the failure; the connection stays usable
                send_quietly(conn, frame(msgpack.packb({"error": f"{type(e).__name__}: {e}"})))
            try:
                framed.idle()
            except OSError:  # closed under us (the server is closing)
                return

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
        if req.region is not None and not (isinstance(req.region, str) and REGION_NAME.match(req.region)):
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

    def _answer_shared(self, req: SharedRequest, theirs: Attached, batch: dict) -> float:
        """Compute this pool's span of the gateway's shared plan into the span's output slots;
        returns the seconds of expert math."""
        key = (req.tokens, req.top_k, req.dtype)
        if req.region is not None or batch.get("key") != key:
            batch.clear()  # drop old views first, so a renamed region can be unmapped
            buf = theirs.view(req.region)
            need = sum(batch_layout(req.tokens, req.top_k, self.hidden, DTYPES[req.dtype]))
            if buf is None or len(buf) < need:
                raise ValueError(f"region: {0 if buf is None else len(buf)} bytes, the batch needs {need}")
            batch["views"] = batch_views(buf, req.tokens, req.top_k, self.hidden, DTYPES[req.dtype])
            batch["key"] = key
        views = batch["views"]
        check_span(views.index, req.start, req.end, req.tokens, req.top_k, self.limits.num_experts)
        return self._compute(req.layer, views, req.start, req.end)

    def _answer_inline(self, framed: Framed, head: dict) -> None:
        n, d, dtype = head["t"], self.hidden, DTYPES[head["dtype"]]
        bx, bi, bw = inline_layout(n, d, dtype)
        buf = framed.exact(bx + bi + bw)
        pairs = np.arange(n)
        index = np.stack([pairs, pairs, tensor_at(buf, bx, bi, (n,), torch.long).numpy()])  # one row per pair
        check_span(index, 0, n, n, 1, self.limits.num_experts)
        batch = PairBatch(
            tensor_at(buf, 0, bx, (n, d), dtype),
            index,
            tensor_at(buf, bx + bi, bw, (n,), dtype),
            torch.empty(n, d, dtype=dtype),
        )
        compute_s = self._compute(head["layer"], batch, 0, n)
        framed.send((n, compute_s), [raw_bytes(batch.out)])

    def close(self) -> None:
        self._closed = True
        for sock in [self._uds, self._tcp] + list(self._conns):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
