"""A bounded, thread-safe cache of DNS answers that expire with their TTL."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")

#: Longest time any answer is kept, whatever its TTL says (one day).
MAX_TTL = 86400
#: Longest time a negative answer is kept (RFC 2308 section 5 suggests 1-3 hours).
MAX_NEGATIVE_TTL = 3600


class DnsCache(Generic[V]):
    """LRU map from a query key to an answer, each entry living for its TTL.

    Shared by every connection thread; all operations take one lock and are
    O(1).  ``maxsize`` 0 disables caching.  ``clock`` is a monotonic time
    source in seconds.
    """

    def __init__(
        self,
        maxsize: int,
        *,
        max_ttl: float = MAX_TTL,
        max_negative_ttl: float = MAX_NEGATIVE_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if maxsize < 0:
            raise ValueError(f"cache size must not be negative, got {maxsize}")
        self.maxsize = maxsize
        self.max_ttl = max_ttl
        self.max_negative_ttl = max_negative_ttl
        self._clock = clock
        self._entries: OrderedDict[Hashable, tuple[float, V]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, key: Hashable) -> V | None:
        """The live answer for *key*, or None (a miss) if absent or expired."""
        entry = self.get_entry(key)
        return None if entry is None else entry[1]

    def get_entry(self, key: Hashable) -> tuple[float, V] | None:
        """(expiry time on the cache's clock, answer) for *key*, or None on a miss."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                if entry[0] > self._clock():
                    self._entries.move_to_end(key)
                    self.hits += 1
                    return entry
                del self._entries[key]
            self.misses += 1
            return None

    def expiry(self, ttl: float, *, negative: bool = False) -> float:
        """When an answer put now with *ttl* would expire (capped as put() caps it)."""
        if self.maxsize == 0:
            return self._clock()
        return self._clock() + max(0.0, min(ttl, self.max_negative_ttl if negative
                                             else self.max_ttl))

    def put(self, key: Hashable, value: V, ttl: float, *, negative: bool = False) -> None:
        """Keep *value* for *ttl* seconds (capped); a TTL of 0 is not cached."""
        ttl = min(ttl, self.max_negative_ttl if negative else self.max_ttl)
        if self.maxsize == 0 or ttl <= 0:
            return
        with self._lock:
            self._entries[key] = (self._clock() + ttl, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)
                self.evictions += 1

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def stats(self) -> dict[str, int]:
        """Counters for logging and tests: hits, misses, evictions, size, maxsize."""
        with self._lock:
            return {
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
                "size": len(self._entries),
                "maxsize": self.maxsize,
            }
