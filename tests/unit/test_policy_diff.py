"""policy diff: each kind of change is marked widening or narrowing, conservatively."""

from __future__ import annotations

from pathlib import Path

import pytest

from connector.errors import PolicyError
from connector.policy.diff import Change, diff_policies, widens
from connector.policy.diff_sets import diff_sets, load_policies
from connector.policy.filter_order import Direction
from connector.policy.model import UsagePolicy, parse_policy

BASE = {
    "id": "supplier-quality",
    "version": "1",
    "description": "Defects for quality benchmarking",
    "datasets": "[part_defects]",
    "grantees": "{members: [voltcell]}",
    "purposes": "[quality-benchmarking]",
    "valid": "{from: 2026-01-01, until: 2030-01-01}",
    "columns": "{allow: [plant, week, defects], mask: {supplier: hash}}",
}
W, N = Direction.WIDENS, Direction.NARROWS


def policy(**terms: str | None) -> UsagePolicy:
    """A policy of BASE with terms replaced (None: left out)."""
    merged = {**BASE, **terms}
    text = "".join(f"{key}: {value}\n" for key, value in merged.items() if value is not None)
    return parse_policy(Path("policy.yaml"), text.encode())


def changes(old: dict[str, str | None], new: dict[str, str | None]) -> list[tuple[Direction, str]]:
    """(direction, text) of every change that is not a note."""
    found = diff_policies(policy(**old), policy(**new))
    return [(c.direction, c.text) for c in found if c.direction is not Direction.NOTE]


def only(old: dict[str, str | None], new: dict[str, str | None]) -> tuple[Direction, str]:
    (change,) = changes(old, new)
    return change


def test_an_identical_policy_has_no_change() -> None:
    assert diff_policies(policy(), policy()) == []


def test_description_and_version_are_notes_that_do_not_widen() -> None:
    found = diff_policies(policy(), policy(version="2", description="New words"))
    assert {c.direction for c in found} == {Direction.NOTE}
    assert not widens(found)


@pytest.mark.parametrize(
    ("key", "old", "new", "direction", "words"),
    [
        (
            "grantees",
            "{members: [voltcell]}",
            "{members: [voltcell, axle]}",
            W,
            "member axle added",
        ),
        ("grantees", "{members: [voltcell, axle]}", "{members: [axle]}", N, "voltcell removed"),
        ("purposes", "[quality-benchmarking]", "[quality-benchmarking, ads]", W, "purpose ads"),
        ("purposes", "[quality-benchmarking, ads]", "[ads]", N, "purpose quality-benchmarking"),
        ("datasets", "[part_defects]", "[part_defects, prices]", W, "dataset prices added"),
        ("datasets", "[part_defects, prices]", "[prices]", N, "dataset part_defects removed"),
    ],
)
def test_members_purposes_and_datasets(
    key: str, old: str, new: str, direction: Direction, words: str
) -> None:
    found, text = only({key: old}, {key: new})
    assert found is direction and words in text


@pytest.mark.parametrize(
    ("new", "direction", "words"),
    [
        ("{allow: [plant, week, defects, price], mask: {supplier: hash}}", W, "column price added"),
        ("{allow: [plant, week], mask: {supplier: hash}}", N, "column defects dropped"),
        ("{allow: [plant, week, defects]}", N, "column supplier dropped"),
        ("{allow: [plant, week, defects, supplier]}", W, "mask loosened on supplier"),
        ("{allow: [plant, week, defects], mask: {supplier: null}}", N, "mask tightened"),
        ("{allow: [plant, week], mask: {supplier: hash, defects: redact}}", N, "tightened"),
        ("{allow: [plant, week, defects], mask: {supplier: hash, x: null}}", W, "column x added"),
    ],
)
def test_columns_and_masks(new: str, direction: Direction, words: str) -> None:
    found, text = only({}, {"columns": new})
    assert found is direction and words in text


def test_a_mask_changed_between_kinds_that_show_nothing_is_reviewed_as_widening() -> None:
    found, text = only(
        {"columns": "{allow: [plant], mask: {supplier: null}}"},
        {"columns": "{allow: [plant], mask: {supplier: redact}}"},
    )
    assert found is W and "review" in text


@pytest.mark.parametrize(
    ("old", "new", "direction", "words"),
    [
        ("{where: {plant: [A, B]}}", "{where: {plant: [A, B, C]}}", W, "widened"),
        ("{where: {plant: [A, B]}}", "{where: {plant: [A]}}", N, "narrowed"),
        ("{where: {plant: [A, B]}}", "{where: {plant: [A, C]}}", W, "widened"),
        ("{where: {plant: [A]}}", None, W, "filter removed"),
        (None, "{where: {plant: [A]}}", N, "filter added"),
        ("{where: {plant: [A], week: [1]}}", "{where: {plant: [A]}}", W, "week"),
        ("{where: {week: {gte: 10}}}", "{where: {week: {gte: 12}}}", N, "narrowed"),
        ("{where: {week: {gte: 10}}}", "{where: {week: {gte: 8}}}", W, "widened"),
        ("{where: {week: {gte: 10}}}", "{where: {week: {gt: 10}}}", N, "narrowed"),
        ("{where: {week: {gt: 10}}}", "{where: {week: {gte: 10}}}", W, "widened"),
        ("{where: {week: {lt: 20}}}", "{where: {week: {lt: 30}}}", W, "widened"),
        ("{where: {week: {lt: 20}}}", "{where: {week: {gte: 1, lt: 20}}}", N, "narrowed"),
        ("{where: {week: {gte: 1, lt: 20}}}", "{where: {week: {lt: 20}}}", W, "widened"),
        ("{where: {week: {gte: 1, lt: 20}}}", "{where: {week: [3, 4]}}", N, "narrowed"),
        ("{where: {week: {gte: 1, lt: 20}}}", "{where: {week: [3, 20]}}", W, "widened"),
        ("{where: {week: [3, 4]}}", "{where: {week: {gte: 3, lte: 4}}}", W, "widened"),
        ("{where: {day: {gte: 2026-01-01}}}", "{where: {day: {gte: 2026-02-01}}}", N, "narrowed"),
        ("{where: {plant: {gte: B}}}", "{where: {plant: {gte: C}}}", W, "changed: review"),
        ("{where: {week: {gte: 1}}}", "{where: {week: {gte: '2'}}}", W, "changed: review"),
        ("{where: {flag: [1]}}", "{where: {flag: [true]}}", W, "widened"),
    ],
)
def test_row_filters(old: str | None, new: str | None, direction: Direction, words: str) -> None:
    found, text = only({"rows": old}, {"rows": new})
    assert found is direction and words in text


def test_row_filters_equal_up_to_order_and_number_spelling_are_no_change() -> None:
    assert changes({"rows": "{where: {w: [1, 2]}}"}, {"rows": "{where: {w: [2.0, 1]}}"}) == []


AGG = "{min_group_size: 20}"


@pytest.mark.parametrize(
    ("old", "new", "direction", "words"),
    [
        (AGG, "{min_group_size: 10}", W, "lowered: 20 -> 10"),
        (AGG, "{min_group_size: 50}", N, "raised: 20 -> 50"),
        (AGG, None, W, "no longer aggregate-only"),
        (None, AGG, N, "now aggregate-only"),
        (AGG, "{min_group_size: 20, group_by: [[plant]]}", N, "grouping now limited to (plant)"),
        ("{min_group_size: 20, group_by: [[plant]]}", AGG, W, "no longer limited"),
        (
            "{min_group_size: 20, group_by: [[plant]]}",
            "{min_group_size: 20, group_by: [[plant], [plant, week]]}",
            W,
            "grouping by (plant, week) added",
        ),
        (
            "{min_group_size: 20, group_by: [[plant], [week]]}",
            "{min_group_size: 20, group_by: [[week]]}",
            N,
            "grouping by (plant) removed",
        ),
    ],
)
def test_aggregate_only_group_size_and_grouping(
    old: str | None, new: str | None, direction: Direction, words: str
) -> None:
    found, text = only({"aggregate_only": old}, {"aggregate_only": new})
    assert found is direction and words in text


def noise(epsilon: str = "1.0", daily: str = "5.0", bounds: str = "{defects: [0, 100]}") -> str:
    terms = f"epsilon: {epsilon}, epsilon_per_day: {daily}, bounds: {bounds}"
    return f"{{min_group_size: 20, noise: {{{terms}}}}}"


@pytest.mark.parametrize(
    ("old", "new", "direction", "words"),
    [
        (noise(), AGG, W, "noise removed"),
        (AGG, noise(), N, "noise added"),
        (noise(), noise(epsilon="2.0"), W, "epsilon a query raised"),
        (noise(), noise(epsilon="0.5"), N, "epsilon a query lowered"),
        (noise(), noise(daily="9"), W, "epsilon a day per member raised"),
        (noise(), noise(bounds="{defects: [0, 100], week: [1, 53]}"), W, "week may now be summed"),
        (noise(bounds="{defects: [0, 100], week: [1, 53]}"), noise(), N, "no longer be summed"),
        (noise(), noise(bounds="{defects: [0, 50]}"), W, "review"),
    ],
)
def test_noise(old: str, new: str, direction: Direction, words: str) -> None:
    found, text = only({"aggregate_only": old}, {"aggregate_only": new})
    assert found is direction and words in text


@pytest.mark.parametrize(
    ("old", "new", "direction", "words"),
    [
        ("{queries_per_day: 500}", None, W, "queries a day removed"),
        (None, "{queries_per_day: 500}", N, "queries a day set"),
        ("{rows_per_day: 500}", "{rows_per_day: 600}", W, "raised: 500 -> 600"),
        ("{max_rows_per_query: 500}", "{max_rows_per_query: 5}", N, "lowered: 500 -> 5"),
        ("{bytes_per_day: 5}", "{max_bytes_per_query: 5}", W, "bytes a day removed"),
    ],
)
def test_limits(old: str | None, new: str | None, direction: Direction, words: str) -> None:
    found = changes({"limits": old}, {"limits": new})
    assert (direction, next(t for d, t in found if words in t)) in found


@pytest.mark.parametrize(
    ("new", "direction", "words"),
    [
        ("{from: 2026-01-01, until: 2031-01-01}", W, "valid until later"),
        ("{from: 2026-01-01, until: 2029-01-01}", N, "valid until earlier"),
        ("{from: 2025-06-01, until: 2030-01-01}", W, "valid from earlier"),
        ("{from: 2026-06-01, until: 2030-01-01}", N, "valid from later"),
    ],
)
def test_validity(new: str, direction: Direction, words: str) -> None:
    found, text = only({}, {"valid": new})
    assert found is direction and words in text


@pytest.mark.parametrize(
    ("old", "new", "direction", "words"),
    [
        ("{delete_within_days: 90}", "{delete_within_days: 180}", W, "kept longer"),
        ("{delete_within_days: 90}", "{delete_within_days: 30}", N, "deleted sooner"),
        ("{delete_within_days: 90}", None, W, "deadline removed"),
        (None, "{delete_within_days: 90}", N, "within 90 days"),
        ("{terms: [no resale]}", "{terms: [no resale, internal use]}", N, "term added"),
        ("{terms: [no resale]}", "{terms: [internal use]}", W, "term removed: no resale"),
        ("{attribution: Source X}", None, W, "attribution no longer required"),
        (None, "{attribution: Source X}", N, "attribution now required"),
        ("{attribution: Source X}", "{attribution: Source Y}", W, "review"),
    ],
)
def test_obligations(old: str | None, new: str | None, direction: Direction, words: str) -> None:
    found = changes({"obligations": old}, {"obligations": new})
    assert any(d is direction and words in t for d, t in found), found


def test_a_folder_pairs_by_id_a_new_id_widens_a_removed_one_narrows() -> None:
    kept, gone, new = policy(), policy(id="old-grant"), policy(id="new-grant")
    found = diff_sets({kept.id: kept, gone.id: gone}, {kept.id: kept, new.id: new})
    assert [(c.policy, c.direction) for c in found] == [("new-grant", W), ("old-grant", N)]
    assert widens(found)
    assert not widens(diff_sets({kept.id: kept, gone.id: gone}, {kept.id: kept}))


def test_load_policies_refuses_two_versions_of_one_id_in_a_folder(tmp_path: Path) -> None:
    text = "".join(f"{key}: {value}\n" for key, value in BASE.items())
    (tmp_path / "a.yaml").write_text(text)
    (tmp_path / "b.yaml").write_text(text.replace("version: 1", "version: 2"))
    with pytest.raises(PolicyError, match=r"b\.yaml: policy id supplier-quality is also in"):
        load_policies(tmp_path)


def test_load_policies_names_a_missing_path(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"nothing\.yaml: no such file or folder"):
        load_policies(tmp_path / "nothing.yaml")


def test_change_as_json() -> None:
    change = Change("p", "columns", W, "column x added")
    assert change.as_json() == {
        "policy": "p",
        "area": "columns",
        "direction": "widening",
        "text": "column x added",
    }


def test_a_hashed_column_put_in_the_clear_by_another_policy_widens_as_a_conflict() -> None:
    hashed = policy()
    clear = policy(id="clear-grant", columns="{allow: [plant, supplier]}")
    found = diff_sets({hashed.id: hashed}, {hashed.id: hashed, clear.id: clear})
    conflict = [c for c in found if c.area == "masks"]
    assert len(conflict) == 1 and conflict[0].direction is W
    assert "new conflict: column supplier" in conflict[0].text


def test_a_conflict_resolved_by_withdrawing_a_policy_is_reviewed_as_widening() -> None:
    hashed = policy()
    clear = policy(id="clear-grant", columns="{allow: [plant, supplier]}")
    found = diff_sets({hashed.id: hashed, clear.id: clear}, {hashed.id: hashed})
    assert [(c.area, c.direction) for c in found] == [("policy", N), ("masks", W), ("shaping", W)]
    assert "conflict resolved: column supplier" in found[1].text


def test_withdrawing_one_of_two_policies_that_clash_on_shaping_is_reviewed_as_widening() -> None:
    # Both apply to voltcell's part_defects queries for the purpose, shaped differently: the
    # connector refuses them; without the second, the first answers again.
    masked = policy()
    filtered = policy(id="filtered", rows="{where: {plant: [A]}}")
    found = diff_sets({masked.id: masked, filtered.id: filtered}, {masked.id: masked})
    assert [(c.area, c.direction) for c in found] == [("policy", N), ("shaping", W)]
    assert "clash resolved: voltcell's queries on part_defects" in found[1].text
    added = diff_sets({masked.id: masked}, {masked.id: masked, filtered.id: filtered})
    assert [(c.area, c.direction) for c in added] == [("policy", W), ("shaping", N)]


def test_policies_in_dates_that_do_not_overlap_do_not_clash() -> None:
    early = policy(valid="{from: 2026-01-01, until: 2027-01-01}")
    late = policy(
        id="late", valid="{from: 2027-01-01, until: 2028-01-01}", rows="{where: {p: [A]}}"
    )
    found = diff_sets({early.id: early, late.id: late}, {early.id: early})
    assert [c.area for c in found] == ["policy"]
