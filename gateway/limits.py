"""The engine's serving limits and cache settings: a plain dataclass with no heavy imports, so the
command line and the application's config (`cluster/app_args.py`) read its defaults without torch."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.errors import InvalidRequest


@dataclass(frozen=True)
class EngineLimits:
    """Explicit serving limits, every one enforced with a clear error, and the cache and scheduling
    settings they come with."""

    max_running: int = 64  # sequences in the running batch
    max_queue: int = 256  # requests waiting to run
    max_prompt_len: int | None = None  # default: the model's context minus one
    max_tokens: int = 1024  # largest max_tokens a request may ask for
    max_num_batched_tokens: int = 256  # tokens one step computes: every decode, then prompt chunks
    block_size: int = 16  # positions per KV block
    kv_cache_gb: float = 2.0  # KV + LF cache size (GB, 1e9 bytes); allocated once, touched as used
    num_kv_blocks: int | None = None  # the cache size in blocks instead (block 0 included)
    prefix_caching: bool = True  # share full blocks between requests with the same prefix
    batch_invariant: bool = False  # greedy output independent of the batch and of chunking
    default_max_tokens: int = 16  # a request's max_tokens when it gives none (clamped to the context)
    max_request_id_len: int = 128  # characters of a client-chosen request id
    max_stop_strings: int = 16  # stop strings per request
    max_stop_len: int = 256  # characters of one stop string
    max_stop_token_ids: int = 64  # stop token ids per request

    def check_stop_strings(self, stop: list[str]) -> None:
        """Raise `InvalidRequest` ("stop") for too many, empty or too long stop strings."""
        if len(stop) > self.max_stop_strings:
            raise InvalidRequest("stop", f"at most {self.max_stop_strings} stop strings, got {len(stop)}")
        for s in stop:
            if not s:
                raise InvalidRequest("stop", "stop strings must not be empty")
            if len(s) > self.max_stop_len:
                raise InvalidRequest(
                    "stop", f"a stop string has {len(s)} characters, more than the limit {self.max_stop_len}"
                )
