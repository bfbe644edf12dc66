"""RecentlyUsed: a bounded cache that forgets the least recently used entry first and
everything when what it holds for changes."""

from __future__ import annotations

from connector.recent import RecentlyUsed


def test_the_least_recently_used_entry_goes_first() -> None:
    cache: RecentlyUsed[str, int] = RecentlyUsed(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # a is now the most recent
    cache.put("c", 3)
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (1, None, 3)
    assert len(cache) == 2


def test_a_new_generation_empties_it_and_late_work_of_the_old_one_is_not_kept() -> None:
    cache: RecentlyUsed[str, int] = RecentlyUsed(8)
    old, new = object(), object()
    assert cache.get("q", old) is None
    cache.put("q", 1, old)
    assert cache.get("q", old) == 1
    assert cache.get("q", new) is None  # a commit happened: nothing of before is kept
    cache.put("late", 2, old)  # worked out against the data before the commit
    assert cache.get("late", new) is None and len(cache) == 0
