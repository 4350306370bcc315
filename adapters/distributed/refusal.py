"""An :class:`~adapters.base.AdapterError` as plain data, so that it crosses a process boundary.

``prepare`` in a replica returns a :class:`Refusal` instead of raising: an exception raised in a
Ray actor reaches the caller wrapped in Ray's own error type, and the adapter errors do not all
survive pickling (``ContextLengthExceeded`` takes other constructor arguments than it stores).
The gateway side turns it back into the same error type, with the same fields, so the client
sees exactly the status and body of the single-process server.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from adapters.base import (
    AdapterError,
    ContextLengthExceeded,
    InvalidRequest,
    ModelUnavailable,
    Overloaded,
)

#: Every adapter error by name, most specific first (the first ``isinstance`` match names it).
ERRORS: dict[str, type[AdapterError]] = {
    "context_length_exceeded": ContextLengthExceeded,
    "invalid_request": InvalidRequest,
    "overloaded": Overloaded,
    "unavailable": ModelUnavailable,
    "adapter_error": AdapterError,
}


@dataclass(frozen=True)
class Refusal:
    kind: str
    message: str
    #: the error's attributes (param, code, retry_after, ...): JSON scalars only
    fields: Mapping[str, object] = field(default_factory=dict)

    @classmethod
    def of(cls, error: AdapterError) -> Refusal:
        kind = next(name for name, type_ in ERRORS.items() if isinstance(error, type_))
        scalars = {k: v for k, v in vars(error).items()
                   if v is None or isinstance(v, str | int | float | bool)}
        return cls(kind, error.message, scalars)

    def error(self) -> AdapterError:
        """The error again, of its own type with its own fields (built without its
        constructor, whose arguments differ between types)."""
        type_ = ERRORS[self.kind]
        error = type_.__new__(type_)
        Exception.__init__(error, self.message)
        error.__dict__.update(self.fields)
        return error
