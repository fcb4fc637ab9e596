"""A cache keyed by a model/guide pair that forgets a pair once either program is collected."""

from __future__ import annotations

import weakref
from typing import Any

from pyro_elbo._typing import Guide, Model


class ProgramCache:
    """Values keyed by a model/guide pair, dropped when either program is garbage collected.

    ``obj.model`` is a new bound-method object on every access, so a bound method is keyed by its
    owner and function. Programs that cannot be weakly referenced are held strongly by the cache
    (and so live as long as the cache's owner)."""

    def __init__(self) -> None:
        self._values: dict[tuple[int, ...], Any] = {}
        self._pinned: dict[int, Any] = {}

    @staticmethod
    def _parts(fn: Any) -> tuple[Any, ...]:
        owner, func = getattr(fn, "__self__", None), getattr(fn, "__func__", None)
        return (owner, func) if owner is not None and func is not None else (fn,)

    def _key(self, model: Model, guide: Guide) -> tuple[tuple[int, ...], list[Any]]:
        objects = [*self._parts(model), None, *self._parts(guide)]
        return tuple(id(o) for o in objects), [o for o in objects if o is not None]

    def get(self, model: Model, guide: Guide) -> Any:
        """The value stored for this pair, or ``None``."""
        return self._values.get(self._key(model, guide)[0])

    def values(self) -> list[Any]:
        """The stored values, one per live model/guide pair."""
        return list(self._values.values())

    def put(self, model: Model, guide: Guide, value: Any) -> None:
        """Store ``value`` for this pair until either program is collected."""
        key, objects = self._key(model, guide)
        if key not in self._values:
            for obj in objects:
                try:
                    weakref.finalize(obj, self._values.pop, key, None)
                except TypeError:  # not weakly referenceable: keep it alive so its id is not reused
                    self._pinned[id(obj)] = obj
        self._values[key] = value
