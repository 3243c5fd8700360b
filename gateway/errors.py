"""Typed errors raised at the engine's boundary; the gRPC layer maps each to one status code."""

from __future__ import annotations


class InvalidRequest(ValueError):
    """A request field is invalid; `field` names it (maps to INVALID_ARGUMENT)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message

    def __reduce__(self):  # crosses Ray process boundaries intact
        return (InvalidRequest, (self.field, self.message))


class QueueFull(RuntimeError):
    """The waiting queue is at its configured limit (maps to RESOURCE_EXHAUSTED)."""
