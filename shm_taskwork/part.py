"""The base of the Domain facade's parts (names, reader, letters, table):
each keeps a weak reference to the Domain that owns it, so the two make no
cycle and a Domain that is dropped unclosed closes at once."""
from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .domain import Domain


class DomainPart:
    """A part owned by one Domain, reached as ``self._dom``."""

    def __init__(self, dom: "Domain"):
        self._ref = weakref.ref(dom)

    @property
    def _dom(self) -> "Domain":
        return self._ref()  # type: ignore[return-value]  # alive: it calls its parts
