"""``--shard K/N``: split the work across machines with no coordination.

A study belongs to shard ``K`` (1-based) when ``sha256(shard_key) mod N == K - 1``. The shard
key is the StudyInstanceUID for DICOM and the path relative to the input root for files, so
the assignment does not depend on listing order, on which other studies exist, or on the
machine; the N shards partition the studies exactly.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable, TypeVar

from pipeline.errors import InputError

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    index: int  # 1-based K
    count: int  # N

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def owns(self, shard_key: str) -> bool:
        return shard_of(shard_key, self.count) == self.index


def parse_shard(text: str | None) -> Shard | None:
    """``"K/N"`` with 1 <= K <= N -> Shard; None/"" -> None. Bad text -> InputError."""
    if text is None or not str(text).strip():
        return None
    try:
        k_text, n_text = str(text).strip().split("/")
        k, n = int(k_text), int(n_text)
    except ValueError:
        raise InputError(f"--shard must look like K/N (e.g. 1/4), got {text!r}") from None
    if n < 1 or not 1 <= k <= n:
        raise InputError(f"--shard {text}: need 1 <= K <= N (shards are numbered from 1)")
    return Shard(k, n)


def shard_of(shard_key: str, count: int) -> int:
    """The 1-based shard that owns ``shard_key`` among ``count`` shards."""
    digest = hashlib.sha256(shard_key.encode()).digest()
    return int.from_bytes(digest[:8], "big") % count + 1


def select(items: Iterable[T], shard: Shard | None, key=lambda s: s.shard_key) -> list[T]:
    """The items this shard owns (all of them without a shard)."""
    items = list(items)
    if shard is None:
        return items
    return [it for it in items if shard.owns(key(it))]
