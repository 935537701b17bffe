"""Engine errors across the Ray boundary.

The engine's errors take constructor arguments that pickling does not replay, so Ray cannot rebuild them on
the ingress side. A replica raises `ReplicaEngineError` instead (plain args: the class name, the message and
the attributes) and the ingress turns it back into the same `EngineError` subclass, so the HTTP layer maps it
to the same status, code and headers as `fitserve serve` does.
"""

from __future__ import annotations

from typing import Any

from fitserve.server.engine import types as engine_types
from fitserve.server.engine.types import EngineError


class ReplicaEngineError(Exception):
    """An `EngineError` a replica raised, in a form Ray can pickle."""

    def __init__(self, kind: str, message: str, attributes: dict[str, Any]) -> None:
        super().__init__(kind, message, attributes)
        self.kind = kind
        self.message = message
        self.attributes = attributes

    @classmethod
    def wrap(cls, error: EngineError) -> ReplicaEngineError:
        """The picklable form of `error`."""
        attributes = {key: value for key, value in vars(error).items() if isinstance(value, int | float | str)}
        return cls(type(error).__name__, str(error), attributes)

    def unwrap(self) -> EngineError:
        """The original engine error's class, message and attributes (a plain EngineError for unknown kinds)."""
        kind = getattr(engine_types, self.kind, None)
        error_class = kind if isinstance(kind, type) and issubclass(kind, EngineError) else EngineError
        error = error_class.__new__(error_class)
        Exception.__init__(error, self.message)
        error.__dict__.update(self.attributes)
        return error
