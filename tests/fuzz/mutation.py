"""Shared strategies: mutations of valid text, as a byte-level fuzzer would make them."""

from __future__ import annotations

from hypothesis import strategies as st

# Values that broke or fooled the readers before (issue 18), and their relatives.
TRICKY_SCALARS = [
    "024",
    "010",
    "0",
    "-0",
    "+7",
    "1:30",
    "190:20:30",
    "0x1F",
    "0x",
    "0o17",
    "0b101",
    "1_000",
    "yes",
    "no",
    "No",
    "on",
    "OFF",
    "y",
    "n",
    "true",
    "False",
    "~",
    "null",
    "",
    "''",
    '""',
    ".inf",
    "-.inf",
    ".nan",
    "nan",
    "inf",
    "1e400",
    "9" * 400,
    "1e5",
    ".5",
    "1.",
    "2026-02-30",
    "2027-13-01",
    "2026-1-1",
    "0001-01-01T00:00:00+01:00",
    "9999-12-31T23:59:59-01:00",
    "2026-01-01T08:00:00",
    "2026-01-01 08:00:00 Z",
    "!!int 0x",
    "!!bool maybe",
    "!!python/object:os.system",
    "!!binary aGk=",
    "&a x",
    "*a",
    "<<",
    "=",
    "?",
    "- x",
    "[" * 50,
    "]" * 50,
    "{a: " * 30,
    "[" * 3000 + "]" * 3000,
    "|\n  x",
    ">-\n  y",
    "'unclosed",
    "\ud800",
    "\x00",
    "\x1b[2J",
    "\u2028",
    "é",
    "\t",
    "#",
    "%YAML 1.1",
    "---",
    "...",
]


@st.composite
def mutated(draw: st.DrawFn, seed: str, extra: list[str] | None = None) -> str:
    """seed with a few random edits: splices of tricky values, deletions, repeats, bytes."""
    text = seed
    pieces = TRICKY_SCALARS + (extra or [])
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(text)))
        end = min(len(text), at + draw(st.integers(0, 12)))
        kind = draw(st.integers(0, 4))
        if kind == 0:
            text = text[:at] + draw(st.sampled_from(pieces)) + text[end:]
        elif kind == 1:
            text = text[:at] + text[end:]
        elif kind == 2:
            text = text[:at] + text[at:end] * draw(st.integers(2, 40)) + text[end:]
        elif kind == 3:
            text = text[:at] + draw(st.text(max_size=8)) + text[end:]
        else:
            line_start = text.rfind("\n", 0, at) + 1
            text = text[:line_start] + " " * draw(st.integers(0, 6)) + text[line_start:]
    return text
