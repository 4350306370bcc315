"""The served models by name: ids and aliases -> :class:`~adapters.base.ChatModel`.

A catalog is an immutable snapshot.  While models load in the background the app swaps in a new
snapshot after each one; names of configured models that are not loaded yet resolve to a 503
``model_not_ready`` instead of a 404.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from adapters.base import ChatModel
from gateway.errors import ModelNotFound, ServiceUnavailable


@dataclass(frozen=True)
class ServedModel:
    model: ChatModel
    aliases: tuple[str, ...] = ()
    created: int = field(default_factory=lambda: int(time.time()))
    #: sampling values for fields a request leaves out (the model's configured defaults)
    defaults: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelCatalog:
    """Models keyed by id; ``resolve`` also accepts an alias.  ``pending`` maps the names (ids
    and aliases) of configured models that are still loading to their id."""

    served: Mapping[str, ServedModel]
    pending: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        models: Mapping[str, ChatModel],
        aliases: Mapping[str, tuple[str, ...]] | None = None,
        defaults: Mapping[str, Mapping[str, Any]] | None = None,
        pending: Mapping[str, str] | None = None,
    ) -> ModelCatalog:
        aliases = aliases or {}
        defaults = defaults or {}
        return cls(
            {mid: ServedModel(m, tuple(aliases.get(mid, ())), defaults=dict(defaults.get(mid, {})))
             for mid, m in models.items()},
            dict(pending or {}),
        )

    def with_model(self, model_id: str, served: ServedModel) -> ModelCatalog:
        """A new snapshot with ``served`` loaded (and its names no longer pending)."""
        return ModelCatalog(
            {**self.served, model_id: served},
            {name: mid for name, mid in self.pending.items() if mid != model_id},
        )

    def resolve(self, name: str) -> ServedModel:
        found = self.served.get(name)
        if found is not None:
            return found
        for served in self.served.values():
            if name in served.aliases:
                return served
        if name in self.pending:
            raise ServiceUnavailable(
                f"The model '{self.pending[name]}' is still loading. Please retry shortly.",
                param="model", code="model_not_ready",
            )
        raise ModelNotFound(name)

    def first(self) -> ServedModel:
        """The first configured model (the one ChatGLM's original API serves)."""
        for served in self.served.values():
            return served
        if self.pending:
            raise ServiceUnavailable("The model is still loading. Please retry shortly.",
                                     code="model_not_ready")
        raise ModelNotFound("(none configured)")

    def __iter__(self) -> Iterator[tuple[str, ServedModel]]:
        return iter(self.served.items())
