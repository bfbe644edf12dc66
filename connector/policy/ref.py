"""A reference to one version of a usage policy, written `id@version` everywhere."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class PolicyRef:
    """A policy (id and version) under which something was decided or answered."""

    id: str
    version: int

    def __str__(self) -> str:
        return f"{self.id}@{self.version}"


def policy_refs(pairs: Iterable[tuple[str, int]]) -> tuple[PolicyRef, ...]:
    """Sorted, de-duplicated references from (id, version) pairs."""
    return tuple(PolicyRef(i, v) for i, v in sorted(set(pairs)))


def joined(refs: Iterable[PolicyRef]) -> str:
    """References as one line of text, like `a@1, b@2`."""
    return ", ".join(str(ref) for ref in refs)
