"""What a new version of a policy grants and takes away, each change widening or narrowing
(across a set of policies: diff_sets.py).

Conservative by rule: a change is narrowing only when the new terms provably grant no more than
the old ones; every other change (one that cannot be ordered, such as a text bound on a column
of unknown type) is widening, so a review step asks for a second signature.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from connector.policy.explain import LIMIT_WORDS, filter_words, moment_words
from connector.policy.filter_order import Direction, filter_direction, ordered
from connector.policy.model import Obligations, UsagePolicy
from connector.shaping import Noise, RowFilter, Shaping

ABSENT = "not shown"
CLEAR = "in the clear"
# How much of a column's values a peer learns: a hash keeps equality, redact and null nothing.
EXPOSURE: dict[str, int] = {ABSENT: 0, "null": 1, "redact": 1, "hash": 2, CLEAR: 3}


@dataclass(frozen=True)
class Change:
    """One difference between two versions of a policy."""

    policy: str
    area: str
    direction: Direction
    text: str

    def as_json(self) -> dict[str, str]:
        """The change as plain JSON values."""
        return {
            "policy": self.policy,
            "area": self.area,
            "direction": self.direction.value,
            "text": self.text,
        }


def widens(changes: Iterable[Change]) -> bool:
    """True when any change grants more access than before."""
    return any(change.direction is Direction.WIDENS for change in changes)


def diff_policies(old: UsagePolicy, new: UsagePolicy) -> list[Change]:
    """Every difference between two versions of one policy, each marked."""
    name = new.id if old.id == new.id else f"{old.id} -> {new.id}"
    found = _Found(name)
    if old.id != new.id:
        found.note(
            "policy", f"id changed from {old.id} to {new.id}: the connector sees two policies"
        )
    if old.version != new.version:
        found.note("policy", f"version {old.version} -> {new.version}")
    if old.description != new.description:
        found.note("description", f"now reads: {new.description}")
    found.members("members", "member", old.members, new.members)
    found.members("roles", "role", old.roles, new.roles)
    found.members("purposes", "purpose", old.purposes, new.purposes)
    found.members("datasets", "dataset", old.datasets, new.datasets)
    _columns(found, old, new)
    _filters(found, old.shaping.filters, new.shaping.filters)
    _aggregate(found, old.shaping, new.shaping)
    _noise(found, old.shaping.noise, new.shaping.noise)
    _validity(found, old, new)
    for key, words in LIMIT_WORDS.items():
        _limit(found, words, getattr(old.limits, key), getattr(new.limits, key))
    _obligations(found, old.obligations, new.obligations)
    return found.changes


class _Found:
    """Collects the changes of one policy."""

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self.changes: list[Change] = []

    def add(self, area: str, direction: Direction, text: str) -> None:
        self.changes.append(Change(self.policy, area, direction, text))

    def widens(self, area: str, text: str) -> None:
        self.add(area, Direction.WIDENS, text)

    def narrows(self, area: str, text: str) -> None:
        self.add(area, Direction.NARROWS, text)

    def note(self, area: str, text: str) -> None:
        self.add(area, Direction.NOTE, text)

    def members(self, area: str, noun: str, old: Iterable[str], new: Iterable[str]) -> None:
        before, after = set(old), set(new)
        for item in sorted(after - before):
            self.widens(area, f"{noun} {item} added")
        for item in sorted(before - after):
            self.narrows(area, f"{noun} {item} removed")


def _shown_as(policy: UsagePolicy) -> dict[str, str]:
    shown: dict[str, str] = dict.fromkeys(policy.columns_allow, CLEAR)
    shown.update(policy.shaping.masks)
    return shown


def _how(state: str) -> str:
    return state if state in (CLEAR, ABSENT) else f"masked ({state})"


def _columns(found: _Found, old: UsagePolicy, new: UsagePolicy) -> None:
    before, after = _shown_as(old), _shown_as(new)
    for column in sorted(before.keys() | after.keys()):
        was, now = before.get(column, ABSENT), after.get(column, ABSENT)
        if was == now:
            continue
        if was == ABSENT:
            found.widens("columns", f"column {column} added: now shown {_how(now)}")
        elif now == ABSENT:
            found.narrows("columns", f"column {column} dropped: no longer shown (was {_how(was)})")
        elif EXPOSURE[now] < EXPOSURE[was]:
            found.narrows("masks", f"mask tightened on {column}: {_how(was)} -> {_how(now)}")
        elif EXPOSURE[now] > EXPOSURE[was]:
            found.widens("masks", f"mask loosened on {column}: {_how(was)} -> {_how(now)}")
        else:
            found.widens("masks", f"mask changed on {column}: {_how(was)} -> {_how(now)}: review")


def _filters(found: _Found, old: Iterable[RowFilter], new: Iterable[RowFilter]) -> None:
    before = {f.column: f for f in old}
    after = {f.column: f for f in new}
    for column in sorted(before.keys() | after.keys()):
        was, now = before.get(column), after.get(column)
        if now is None and was is not None:
            found.widens(
                "rows",
                f"filter removed: rows were only where {filter_words(was)}; now any {column}",
            )
        elif was is None and now is not None:
            found.narrows("rows", f"filter added: now only rows where {filter_words(now)}")
        elif was is not None and now is not None:
            direction = filter_direction(was, now)
            if direction is not None:
                verb = "narrowed" if direction is Direction.NARROWS else "widened"
                if direction is Direction.WIDENS and not ordered(was, now):
                    verb = "changed: review"
                found.add(
                    "rows", direction, f"filter {verb}: {filter_words(was)} -> {filter_words(now)}"
                )


def _aggregate(found: _Found, old: Shaping, new: Shaping) -> None:
    was, now = old.min_group_size, new.min_group_size
    if was and not now:
        found.widens(
            "aggregate-only",
            f"no longer aggregate-only (was groups of {was}): single rows may leave",
        )
    elif now and not was:
        found.narrows("aggregate-only", f"now aggregate-only: groups of at least {now} rows")
    elif now < was:
        found.widens("group size", f"minimum group size lowered: {was} -> {now}")
    elif now > was:
        found.narrows("group size", f"minimum group size raised: {was} -> {now}")
    _group_by(found, old.group_by, new.group_by)


def _group_by(
    found: _Found, old: tuple[tuple[str, ...], ...], new: tuple[tuple[str, ...], ...]
) -> None:
    def words(columns: frozenset[str]) -> str:
        return f"({', '.join(sorted(columns))})"

    before = {frozenset(columns) for columns in old}
    after = {frozenset(columns) for columns in new}
    if before == after:
        return
    if not after:
        found.widens("grouping", "grouping no longer limited: any of the columns shown")
        return
    if not before:
        limited = "; ".join(sorted(words(c) for c in after))
        found.narrows("grouping", f"grouping now limited to {limited}")
        return
    for columns in sorted(after - before, key=sorted):
        found.widens("grouping", f"grouping by {words(columns)} added")
    for columns in sorted(before - after, key=sorted):
        found.narrows("grouping", f"grouping by {words(columns)} removed")


def _noise(found: _Found, old: Noise | None, new: Noise | None) -> None:
    if old is None or new is None:
        if old is not None:
            found.widens("noise", f"noise removed: aggregates are now exact (was {old.describe()})")
        elif new is not None:
            found.narrows("noise", f"noise added: {new.describe()}")
        return
    for words, was, now in (
        ("epsilon a query", old.epsilon, new.epsilon),
        ("epsilon a day per member", old.epsilon_per_day, new.epsilon_per_day),
    ):
        if now > was:
            found.widens("noise", f"{words} raised (less noise): {was:g} -> {now:g}")
        elif now < was:
            found.narrows("noise", f"{words} lowered (more noise): {was:g} -> {now:g}")
    before, after = old.bounds_of, new.bounds_of
    for column in sorted(before.keys() | after.keys()):
        was_range, now_range = before.get(column), after.get(column)
        if was_range is None:
            found.widens(
                "noise", f"column {column} may now be summed, clamped to {list(now_range or ())}"
            )
        elif now_range is None:
            found.narrows("noise", f"column {column} may no longer be summed")
        elif was_range != now_range:
            found.widens(
                "noise",
                f"clamp of {column} changed: {list(was_range)} -> {list(now_range)}: review",
            )


def _validity(found: _Found, old: UsagePolicy, new: UsagePolicy) -> None:
    change = f"{moment_words(old.valid_from)} -> {moment_words(new.valid_from)}"
    if new.valid_from < old.valid_from:
        found.widens("validity", f"valid from earlier: {change}")
    elif new.valid_from > old.valid_from:
        found.narrows("validity", f"valid from later: {change}")
    change = f"{moment_words(old.valid_until)} -> {moment_words(new.valid_until)}"
    if new.valid_until > old.valid_until:
        found.widens("validity", f"valid until later: {change}")
    elif new.valid_until < old.valid_until:
        found.narrows("validity", f"valid until earlier: {change}")


def _limit(found: _Found, words: str, was: int, now: int) -> None:
    """A limit of 0 is no limit at all."""
    if was == now:
        return
    if not now:
        found.widens("limits", f"limit on {words} removed (was {was})")
    elif not was:
        found.narrows("limits", f"limit on {words} set: at most {now}")
    elif now > was:
        found.widens("limits", f"limit on {words} raised: {was} -> {now}")
    else:
        found.narrows("limits", f"limit on {words} lowered: {was} -> {now}")


def _obligations(found: _Found, old: Obligations, new: Obligations) -> None:
    was, now = old.delete_within_days, new.delete_within_days
    if was != now:
        if not now:
            found.widens("obligations", f"deletion deadline removed (was {was} days)")
        elif not was:
            found.narrows("obligations", f"received data must now be deleted within {now} days")
        elif now > was:
            found.widens("obligations", f"data may be kept longer: {was} -> {now} days")
        else:
            found.narrows("obligations", f"data must be deleted sooner: {was} -> {now} days")
    if old.attribution != new.attribution:
        if not new.attribution:
            found.widens("obligations", f"attribution no longer required (was: {old.attribution})")
        elif not old.attribution:
            found.narrows("obligations", f"attribution now required: {new.attribution}")
        else:
            found.widens(
                "obligations",
                f"attribution changed: review: {old.attribution} -> {new.attribution}",
            )
    for term in sorted(set(old.terms) - set(new.terms)):
        found.widens("obligations", f"term removed: {term}")
    for term in sorted(set(new.terms) - set(old.terms)):
        found.narrows("obligations", f"term added: {term}")
