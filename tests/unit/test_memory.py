"""Free memory is given back once, after requests stop for a while."""

from __future__ import annotations

from connector.memory import QuietTrimmer, release_free_memory


def test_trims_once_after_activity_stops() -> None:
    trimmer = QuietTrimmer(quiet_seconds=0)
    assert not trimmer.observe(0)  # nothing served yet: nothing to give back
    assert not trimmer.observe(5)  # busy
    assert trimmer.observe(5)  # quiet since the last request
    assert not trimmer.observe(5)  # already trimmed; stays quiet
    assert not trimmer.observe(6)
    assert trimmer.observe(6)


def test_waits_for_the_quiet_period() -> None:
    trimmer = QuietTrimmer(quiet_seconds=3600)
    trimmer.observe(1)
    assert not trimmer.observe(1)


def test_release_is_safe_to_call() -> None:
    release_free_memory()
