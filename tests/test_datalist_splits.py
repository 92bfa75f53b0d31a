"""split_items: the 85/15 seed-42 split is pinned, order-independent and stable across processes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from medsam3_monai.data.splits import split_items, validation_count

CASES = [f"case_{i:02d}" for i in range(20)]


def test_pinned_membership_for_a_small_list():
    # Changing the split algorithm (hash, seed format, rounding) must change this and fail the test.
    training, validation = split_items(CASES)
    assert validation == ["case_04", "case_07", "case_08"]
    assert training == [c for c in CASES if c not in validation]


def test_pinned_membership_when_stratified():
    _, validation = split_items(CASES, stratify=lambda c: int(c[-2:]) % 2)
    assert validation == ["case_04", "case_05", "case_07", "case_08"]


def test_split_ignores_input_order_and_depends_on_seed():
    assert split_items(list(reversed(CASES))) == split_items(CASES)
    assert split_items(CASES, seed=43)[1] != split_items(CASES)[1]


def test_split_is_the_same_in_a_fresh_interpreter_with_another_hash_seed():
    code = (
        "from medsam3_monai.data.splits import split_items; "
        "print(split_items([f'case_{i:02d}' for i in range(20)])[1])"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert output.strip() == "['case_04', 'case_07', 'case_08']"


def test_adding_an_item_moves_no_other_item():
    _, before = split_items(CASES)
    _, after = split_items([*CASES, "case_99"])
    moved = set(before) ^ (set(after) - {"case_99"})
    assert len(moved) <= 1  # only the validation-count boundary can move one item


def test_items_are_dicts_keyed_by_case_then_image():
    items = [{"case": c, "image": f"/x/{c}.png"} for c in CASES]
    assert [i["case"] for i in split_items(items)[1]] == ["case_04", "case_07", "case_08"]
    no_case = [{"image": c} for c in CASES]
    assert [i["image"] for i in split_items(no_case)[1]] == ["case_04", "case_07", "case_08"]


@pytest.mark.parametrize(
    ("n", "expected"), [(0, 0), (1, 0), (2, 1), (4, 1), (5, 1), (20, 3), (30, 5), (40, 6), (149, 22), (260, 39)]
)
def test_validation_count_rounds_half_up_with_at_least_one(n, expected):
    assert validation_count(n, 0.15) == expected


def test_duplicate_keys_and_bad_fraction_are_errors():
    with pytest.raises(ValueError, match="duplicate split key 'a'"):
        split_items(["a", "b", "a"])
    with pytest.raises(ValueError, match="val_fraction"):
        split_items(CASES, val_fraction=1.5)
