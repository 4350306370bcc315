"""The served models by name: ids and aliases -> :class:`~adapters.base.ChatModel`."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from adapters.base import ChatModel
from gateway.errors import ModelNotFound


@dataclass(frozen=True)
class ServedModel:
    model: ChatModel
    aliases: tuple[str, ...] = ()
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass(frozen=True)
class ModelCatalog:
    """Models keyed by id; ``resolve`` also accepts an alias."""

    served: Mapping[str, ServedModel]

    @classmethod
    def build(
        cls, models: Mapping[str, ChatModel], aliases: Mapping[str, tuple[str, ...]] | None = None
    ) -> ModelCatalog:
        aliases = aliases or {}
        return cls({mid: ServedModel(m, tuple(aliases.get(mid, ()))) for mid, m in models.items()})

    def resolve(self, name: str) -> ServedModel:
        found = self.served.get(name)
        if found is not None:
            return found
        for served in self.served.values():
            if name in served.aliases:
                return served
        raise ModelNotFound(name)

    def __iter__(self) -> Iterator[tuple[str, ServedModel]]:
        return iter(self.served.items())
