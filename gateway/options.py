"""How a gateway's server listens: bind address, auth, TLS, drain. No heavy imports (the command line
and `cluster/app_args.py` read the defaults)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServerOptions:
    host: str = "127.0.0.1"  # loopback unless asked otherwise
    port: int = 50051  # 0: any free port (tests)
    token: str | None = None  # bearer token required on every call but health
    tls_cert: str | None = None  # PEM paths; both or neither
    tls_key: str | None = None
    grace_s: float = 10.0  # drain: time in-flight calls get before they are cancelled
    start_timeout_s: float = 300.0
    # Bind only once the backend is up. Gateways sharing a port (SO_REUSEPORT) need this: a replica
    # still loading would otherwise take its share of new connections and refuse them all.
    bind_when_ready: bool = False
    http_port: int = 0  # the OpenAI-compatible HTTP API and /metrics on this port of `host`; 0: off
    served_model_name: str | None = None  # the `model` HTTP clients name; default: the checkpoint's folder

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key: give both or neither")
