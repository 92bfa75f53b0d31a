"""Metrics layer: per-case Dice/IoU/NSD/HD95, the class-merge rule, dataset/group tables and reports."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric, MeanIoU

from medsam3_monai.metrics import (
    DEFAULT_NSD_TOLERANCE_MM,
    aggregate,
    case_metrics,
    compare,
    dice,
    hd95,
    iou,
    merge_classes,
    read_cases_csv,
    surface_dice,
    write_cases_csv,
)


def _square(shape, rows, cols):
    m = np.zeros(shape, dtype=bool)
    m[rows[0] : rows[1], cols[0] : cols[1]] = True
    return m


# ---------------------------------------------------------------- Dice / IoU


def test_dice_and_iou_known_answer_on_4x4_masks():
    pred = np.zeros((4, 4), dtype=np.uint8)
    pred[0, :] = 1  # 4 pixels
    truth = np.zeros((4, 4), dtype=np.uint8)
    truth[0, :3] = 1
    truth[1, :2] = 1  # 5 pixels, 3 shared with pred
    assert dice(pred, truth) == pytest.approx(2 * 3 / (4 + 5), abs=1e-12)
    assert iou(pred, truth) == pytest.approx(3 / 6, abs=1e-12)
    # torch input, bool and float {0, 1} dtypes give the same numbers
    assert dice(torch.from_numpy(pred).bool(), torch.from_numpy(truth).float()) == pytest.approx(2 / 3, abs=1e-12)


def test_empty_prediction_and_empty_truth_score_one():
    empty = np.zeros((5, 6), dtype=bool)
    assert dice(empty, empty) == 1.0
    assert iou(empty, empty) == 1.0
    assert surface_dice(empty, empty, spacing=1.0) == 1.0
    assert math.isnan(hd95(empty, empty, spacing=1.0))


def test_empty_truth_with_a_prediction_scores_zero_and_the_reverse_too():
    empty = np.zeros((8, 8), dtype=bool)
    blob = _square((8, 8), (2, 5), (2, 5))
    for pred, truth in ((blob, empty), (empty, blob)):
        assert dice(pred, truth) == 0.0
        assert iou(pred, truth) == 0.0
        assert surface_dice(pred, truth, spacing=1.0) == 0.0
        assert math.isnan(hd95(pred, truth, spacing=1.0))


@pytest.mark.parametrize("shape", [(48, 40), (6, 20, 24)])
def test_dice_and_iou_equal_monai_metrics_on_random_masks(shape):
    gen = torch.Generator().manual_seed(0)
    dice_metric = DiceMetric(include_background=True, reduction="mean")
    iou_metric = MeanIoU(include_background=True, reduction="mean")
    for _ in range(5):
        pred = torch.rand(shape, generator=gen) > 0.6
        truth = torch.rand(shape, generator=gen) > 0.5
        assert truth.any()
        expected_dice = dice_metric(pred[None, None].float(), truth[None, None].float()).item()
        expected_iou = iou_metric(pred[None, None].float(), truth[None, None].float()).item()
        assert dice(pred, truth) == pytest.approx(expected_dice, abs=1e-6)
        assert iou(pred, truth) == pytest.approx(expected_iou, abs=1e-6)


def test_probability_maps_and_wrong_shapes_are_rejected():
    truth = np.zeros((4, 4))
    with pytest.raises(ValueError, match="threshold"):
        dice(np.full((4, 4), 0.7), truth)
    with pytest.raises(ValueError, match="same shape"):
        dice(np.zeros((4, 5)), truth)
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        dice(np.zeros((1, 1, 4, 4)), np.zeros((1, 1, 4, 4)))
    with pytest.raises(ValueError, match="one value per mask axis"):
        hd95(np.ones((4, 4)), np.ones((4, 4)), spacing=(1.0, 1.0, 1.0))


# ---------------------------------------------------------------- HD95


def test_hd95_of_squares_offset_by_k_voxels_is_k_times_spacing():
    # 20x20 squares shifted 3 voxels along axis 1; spacing 0.5 mm (axis 0) x 2 mm (axis 1): every edge voxel
    # lies within 3 x 2 mm of the other edge and about half lie exactly there, so HD95 = 6 mm.
    pred = _square((40, 40), (5, 25), (5, 25))
    truth = _square((40, 40), (5, 25), (8, 28))
    assert hd95(pred, truth, spacing=(0.5, 2.0)) == pytest.approx(6.0)
    assert hd95(pred, truth) == pytest.approx(3.0)  # no spacing: voxels
    # the spacing is read in array-axis order: swapping it changes the answer
    assert hd95(pred, truth, spacing=(2.0, 0.5)) == pytest.approx(1.5)


def test_hd95_in_3d_with_anisotropic_slices():
    pred = np.zeros((20, 16, 16), dtype=bool)
    pred[2:14, 2:14, 2:14] = True
    truth = np.roll(pred, 2, axis=0)  # 2 slices of 3 mm
    assert hd95(pred, truth, spacing=(3.0, 1.0, 1.0)) == pytest.approx(6.0)
    assert hd95(pred, pred, spacing=(3.0, 1.0, 1.0)) == 0.0


# ---------------------------------------------------------------- NSD


def test_nsd_known_answer_for_a_one_voxel_shift():
    # 6x6 squares shifted one column: of the 20 edge voxels of each, 10 lie on the other's edge (top and
    # bottom rows) and 10 lie one column away from it.
    pred = _square((10, 10), (2, 8), (2, 8))
    truth = _square((10, 10), (2, 8), (3, 9))
    assert surface_dice(pred, truth, spacing=2.0, tolerance_mm=1.5) == pytest.approx(0.5)
    assert surface_dice(pred, truth, spacing=2.0, tolerance_mm=2.0) == pytest.approx(1.0)
    # anisotropic: columns 2 mm apart, rows 1 mm apart -> the two side voxels next to a corner of the other
    # square (rows 3 and 6) come within 1 mm of its top/bottom edge: (10 + 2) / 20 per direction.
    assert surface_dice(pred, truth, spacing=(1.0, 2.0), tolerance_mm=1.5) == pytest.approx(0.6)
    assert surface_dice(pred, pred, spacing=(1.0, 2.0), tolerance_mm=0.0) == 1.0


def test_case_metrics_adds_surface_metrics_only_with_spacing():
    pred = _square((10, 10), (2, 8), (2, 8))
    truth = _square((10, 10), (2, 8), (3, 9))
    plain = case_metrics(pred, truth)
    assert set(plain) == {"dice", "iou"}
    full = case_metrics(pred, truth, spacing=(1.0, 1.0))
    assert set(full) == {"dice", "iou", "nsd", "hd95"}
    assert full["dice"] == pytest.approx(2 * 30 / 72)
    assert full["iou"] == pytest.approx(30 / 42)
    assert full["nsd"] == 1.0  # one-voxel shift at 1 mm is inside the default 2 mm tolerance
    assert full["hd95"] == pytest.approx(1.0)
    assert DEFAULT_NSD_TOLERANCE_MM == 2.0
    assert case_metrics(pred, truth, spacing=2.0, nsd_tolerance_mm=1.0)["nsd"] == pytest.approx(0.5)


# ---------------------------------------------------------------- class merge


def test_overlapping_classes_go_to_the_most_confident_claimant():
    conf = torch.tensor(
        [
            [[0.9, 0.6, 0.2, 0.1], [0.7, 0.1, 0.95, 0.5]],  # class 1
            [[0.8, 0.7, 0.9, 0.1], [0.7, 0.1, 0.9, 0.5]],  # class 2
        ]
    )
    masks = torch.tensor(
        [
            [[1, 1, 0, 0], [1, 0, 0, 0]],
            [[1, 1, 1, 0], [1, 0, 1, 0]],
        ]
    )
    labels = merge_classes(conf, masks)
    expected = torch.tensor(
        [
            [1, 2, 2, 0],  # both claim: max wins (0.9 vs 0.8, 0.6 vs 0.7); only class 2 claims; nobody claims
            [1, 0, 2, 0],  # tie -> earlier prompt; unclaimed; class 1 more confident but does not claim
        ],
        dtype=torch.uint8,
    )
    assert torch.equal(labels, expected)


def test_merge_keeps_numpy_3d_and_thresholds_without_masks():
    conf = np.zeros((3, 2, 4, 4), dtype=np.float32)
    conf[0, :, :2] = 0.8
    conf[1, :, 1:3] = 0.9
    conf[2, 1, :, 3] = 0.4  # below the 0.5 threshold: never claims
    labels = merge_classes(conf)
    assert isinstance(labels, np.ndarray) and labels.shape == (2, 4, 4)
    assert (labels[:, 0] == 1).all()
    assert (labels[:, 1:3] == 2).all()
    assert (labels[:, 3] == 0).all()
    with pytest.raises(ValueError, match="differs"):
        merge_classes(conf, np.ones((3, 2, 4, 5)))


# ---------------------------------------------------------------- aggregation and reports


def _records(shift=0.0):
    def rec(ds, group, case, dice_value, iou_value, **more):
        return {
            "dataset": ds,
            "group": group,
            "case": case,
            "prompt": "p",
            "metrics": {"dice": dice_value + shift, "iou": iou_value + shift, **more},
        }

    return [
        rec("A", "internal", "a1", 0.8, 0.7),
        rec("C", "external", "c1", 0.5, 0.4, nsd=0.6, hd95=2.0),
        rec("A", "internal", "a2", 0.6, 0.5),
        rec("B", "internal", "b1", 0.9, 0.8),
        rec("C", "external", "c2", 0.7, 0.6, nsd=0.8, hd95=math.nan),
        rec("C", "external", "c3", 0.9, 0.8, nsd=1.0, hd95=4.0),
    ]


def test_dataset_means_and_group_mean_of_dataset_means():
    table = aggregate(_records())
    assert table.metrics == ("dice", "iou", "nsd", "hd95")
    assert [(r["kind"], r["name"]) for r in table.rows] == [
        ("dataset", "A"),
        ("dataset", "B"),
        ("group", "internal"),
        ("dataset", "C"),
        ("group", "external"),
        ("overall", "overall"),
    ]
    a = table.row("A")
    assert a["n"] == 2
    assert (a["dice"], a["dice_std"], a["iou"]) == (pytest.approx(0.7), pytest.approx(0.1), pytest.approx(0.6))
    assert math.isnan(a["nsd"]) and a["nsd_n"] == 0
    c = table.row("C")
    assert c["dice"] == pytest.approx(0.7)
    assert c["dice_std"] == pytest.approx(math.sqrt(0.08 / 3))
    assert (c["hd95"], c["hd95_n"]) == (pytest.approx(3.0), 2)  # NaN skipped
    internal = table.row("internal", kind="group")
    # mean of dataset means (0.7, 0.9), not of the three cases (0.7667)
    assert internal["dice"] == pytest.approx(0.8)
    assert (internal["n"], internal["n_datasets"], internal["dice_n"]) == (3, 2, 3)  # its datasets' values: 2 + 1
    overall = table.row("overall")
    assert overall["dice_n"] == 6 and overall["nsd_n"] == c["nsd_n"]
    assert overall["dice"] == pytest.approx((0.7 + 0.9 + 0.7) / 3)
    assert overall["nsd"] == pytest.approx(0.8)  # only C has NSD


def test_markdown_shows_percent_with_two_decimals_and_hd95_in_mm():
    md = aggregate(_records()).to_markdown()
    assert "| Dataset | Group | n | Dice (%) | IoU (%) | NSD (%) | HD95 (mm) |" in md
    assert "| A | internal | 2 | 70.00 | 60.00 | – | – |" in md
    assert "| C | external | 3 | 70.00 | 60.00 | 80.00 | 3.00 |" in md
    assert "| **internal (mean of 2 datasets)** | internal | 3 | 80.00 | 70.00 |" in md
    assert "70.00 ± 10.00" in aggregate(_records()).to_markdown(std=True)


def test_compare_gives_b_minus_a_columns():
    table_a = aggregate(_records())
    table_b = aggregate(_records(shift=0.05))
    cmp = compare(table_a, table_b, labels=("SAM3", "Medical SAM3"))
    assert cmp.metrics == ("dice", "iou", "nsd", "hd95")
    row = cmp.row("B")
    assert row["dice_a"] == pytest.approx(0.9)
    assert row["dice_b"] == pytest.approx(0.95)
    assert row["dice_delta"] == pytest.approx(0.05)
    assert cmp.row("external", kind="group")["iou_delta"] == pytest.approx(0.05)
    assert cmp.row("C")["hd95_delta"] == pytest.approx(0.0)
    md = cmp.to_markdown()
    assert "Dice (%) SAM3 | Dice (%) Medical SAM3 | Δ Dice" in md
    assert "| B | internal | 90.00 | 95.00 | +5.00 |" in md


def test_compare_keeps_rows_missing_from_one_table_as_nan():
    table_a = aggregate([r for r in _records() if r["dataset"] != "B"])
    cmp = compare(table_a, aggregate(_records()))
    b = cmp.row("B")
    assert math.isnan(b["dice_a"]) and b["dice_b"] == pytest.approx(0.9) and math.isnan(b["dice_delta"])


def test_csv_reports_round_trip(tmp_path):
    records = _records()
    path = write_cases_csv(records, tmp_path / "cases.csv")
    header = path.read_text().splitlines()[0]
    assert header == "dataset,group,case,prompt,protocol,dice,iou,nsd,hd95"  # the metrics in the tables' order
    back = read_cases_csv(path)
    assert [r["case"] for r in back] == [r["case"] for r in records]
    again = aggregate(back)
    for name in ("A", "C", "internal", "overall"):
        for m in ("dice", "hd95"):
            x, y = aggregate(records).row(name)[m], again.row(name)[m]
            assert (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y)
    table_path = aggregate(records).to_csv(tmp_path / "sub" / "table.csv")
    rows = list(csv.DictReader(table_path.open()))
    assert rows[0]["name"] == "A" and float(rows[0]["dice"]) == pytest.approx(0.7)
    assert rows[0]["nsd"] == ""  # NaN written blank
    cmp_path = compare(aggregate(records), aggregate(_records(0.05))).to_csv(tmp_path / "cmp.csv")
    assert "dice_delta" in cmp_path.read_text().splitlines()[0]


def test_aggregate_refuses_a_dataset_of_two_protocols_and_split_datasets():
    records = _records()
    records[0]["protocol"] = "top-query"
    records[2]["protocol"] = "union"  # dataset A's second case
    with pytest.raises(ValueError, match="dataset 'A' has records of evaluation protocols 'top-query' and 'union'"):
        aggregate(records)
    records = [dict(r, protocol="union" if r["dataset"] == "C" else "top-query") for r in _records()]
    mixed = aggregate(records)  # datasets of two protocols (a run's pictures and volumes): each row says its own
    assert mixed.protocol == "top-query, union" and mixed.row("C")["protocol"] == "union"
    assert mixed.row("internal", "group")["protocol"] == "top-query"
    assert "| Dataset | Group | Protocol | n |" in mixed.to_markdown()
    side_by_side = compare(mixed, mixed).to_markdown()
    assert "| Dataset | Group | Protocol | Dice (%) A |" in side_by_side and "| C | external | union |" in side_by_side
    records = _records()
    records[0]["group"] = "external"
    with pytest.raises(ValueError, match="groups"):
        aggregate(records)
    one = [dict(r, protocol="top-query") for r in _records()]
    table = aggregate(one)
    assert table.protocol == "top-query"
    assert "protocol: top-query" in table.to_markdown()


@pytest.mark.parametrize("spacing", [None, (1.0, 0.5, 2.0)])
def test_label_map_metrics_equal_per_value_case_metrics(spacing):
    from medsam3_monai.metrics import case_metrics, label_map_metrics, label_overlaps

    generator = torch.Generator().manual_seed(3)
    shape = (6, 20, 24) if spacing else (40, 50)
    pred = torch.randint(0, 5, shape, generator=generator, dtype=torch.int32)
    truth = torch.randint(0, 5, shape, generator=generator).to(torch.uint8)
    pred[pred == 4] = 0  # value 4: predicted nowhere
    truth[truth == 3] = 7  # value 3: absent from the truth; 7 is not asked for
    values = [1, 2, 3, 4, 9]  # 9: in neither map (both empty: Dice 1)
    got = label_map_metrics(pred, truth, values, spacing)
    for value, (metrics, predicted, in_truth) in zip(values, got):
        expected = case_metrics(pred == value, truth == value, spacing)
        assert metrics.keys() == expected.keys()
        for name, number in expected.items():
            assert metrics[name] == pytest.approx(number, nan_ok=True), (value, name)
        assert predicted == int((pred == value).sum()) and in_truth == int((truth == value).sum())
    assert got[4][0]["dice"] == 1.0 and got[3][0]["dice"] == 0.0
    one_by_one = [(int(((pred == v) & (truth == v)).sum()), int((pred == v).sum()), int((truth == v).sum()))
                  for v in values]
    assert label_overlaps(pred, truth, values) == one_by_one  # the joint histogram (5 values)
    assert [label_overlaps(pred, truth, [v])[0] for v in values] == one_by_one  # value by value
    with pytest.raises(ValueError, match="positive"):
        label_overlaps(pred, truth, [0])
    with pytest.raises(ValueError, match="same shape"):
        label_map_metrics(pred, truth[..., :-1], values)


def test_an_overlay_of_many_classes_lists_those_largest_on_the_picture_beside_its_panels(tmp_path):
    from PIL import Image

    from medsam3_monai.engines.reports import _score_line
    from medsam3_monai.metrics.plots import LEGEND_MAX, class_areas, class_legend, overlay_figure

    values, names = list(range(1, 31)), [f"organ {v}" for v in range(1, 31)]
    truth, pred = np.zeros((60, 80), np.uint8), np.zeros((60, 80), np.uint8)
    for v in range(1, 16):  # organs 1-15 on the picture, organ v covering v columns of truth; 16-30 absent
        truth[: v + 2, 5 * (v - 1): 5 * (v - 1) + 5] = v
    pred[40:, :] = 30  # and a large false positive of organ 30
    handles = class_legend(names, class_areas(values, truth, pred))
    labels = [h.get_label() for h in handles]
    assert len(labels) == LEGEND_MAX + 1 and labels[-1] == "+ 18 more classes (30 in all)"
    assert labels[:-1] == [f"organ {v}" for v in (5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 30)]  # largest, in order
    assert [h.get_label() for h in class_legend(names[:3])] == names[:3]  # few classes: all
    image = np.random.default_rng(0).random((60, 80))
    many = Image.open(overlay_figure(image, truth, pred, tmp_path / "many.png", values, names, "t"))
    few = Image.open(overlay_figure(image, truth, pred, tmp_path / "few.png", values[:3], names[:3], "t"))
    assert many.size[0] > few.size[0]  # the legend's own panel widens the figure
    records = [{"prompt": n, "metrics": {"dice": d}} for n, d in zip(names, [0.5, 0.1, 0.9, 0.0, 0.7])]
    assert _score_line(records[:2]) == "organ 1: Dice 50.0, organ 2: Dice 10.0"
    assert _score_line(records) == "5 classes: mean Dice 44.0; lowest: organ 4 0.0, organ 2 10.0, organ 1 50.0"


def test_report_figures_draw_names_with_dollar_signs_as_written(tmp_path):
    """Dataset, case and prompt names reach titles, legends and axis labels; ``$...$`` in one is not mathtext
    (an invalid formula failed the report, a valid one was drawn as a formula)."""
    from medsam3_monai.metrics.plots import class_legend, overlay_figure, plain_text, radar_chart

    names = [r"$\frac{x$", "cost $5 or $10"]
    assert [h.get_label() for h in class_legend(names)] == [r"\$\frac{x\$", r"cost \$5 or \$10"]
    assert plain_text("no dollars") == "no dollars"
    labels = np.zeros((40, 50), np.uint8)
    labels[5:20, 5:20], labels[25:35, 30:45] = 1, 2
    image = np.random.default_rng(0).random((40, 50))
    assert overlay_figure(image, labels, labels, tmp_path / "o.png", [1, 2], names, r"$\frac{y$ / case $1$").is_file()
    records = [dict(r, dataset=r"$\frac{d$" if r["dataset"] == "A" else r["dataset"]) for r in _records()]
    assert radar_chart(aggregate(records), tmp_path / "radar.png", title="per $dataset$").is_file()
    assert radar_chart(aggregate(records[:1]), tmp_path / "bars.png").is_file()


def test_an_overlay_shows_the_box_prompts_in_the_prediction_panel_only(tmp_path):
    """T+I overlays draw each prompt's box (dashed, its class colour) on the prediction panel; the image and truth
    panels stay as without boxes."""
    from PIL import Image

    from medsam3_monai.metrics.plots import overlay_figure

    image, labels = np.zeros((60, 80)), np.zeros((60, 80), np.uint8)
    plain = np.asarray(Image.open(overlay_figure(image, labels, labels, tmp_path / "plain.png", [1, 2])).convert("RGB"))
    boxed = np.asarray(Image.open(overlay_figure(image, labels, labels, tmp_path / "boxed.png", [1, 2],
                                                 boxes=[[10, 5, 50, 40], None])).convert("RGB"))
    changed = np.argwhere((plain != boxed).any(axis=-1))
    assert len(changed) > 50 and changed[:, 1].min() > 2 * plain.shape[1] // 3  # only in the third panel
    colour = boxed[tuple(changed.T)].astype(int)
    assert (colour[:, 2] > colour[:, 0] + 50).any()  # the first class's sky blue dashes (over a dark edge)


def _boxes_at_random(rng, shape, count):
    mask = np.zeros(shape, dtype=bool)
    for _ in range(count):
        low = [int(rng.integers(0, n - 1)) for n in shape]
        high = [int(min(n, a + rng.integers(1, n))) for a, n in zip(low, shape)]
        mask[tuple(slice(a, b) for a, b in zip(low, high))] = True
    return mask


def test_label_fill_paints_value_i_in_the_colour_of_prompt_i():
    from matplotlib.colors import to_rgba

    from medsam3_monai.metrics.plots import CLASS_COLOURS, label_fill

    rgba = label_fill(np.array([[0, 7], [3, 0]]), [7, 3], alpha=0.45)  # prompt order: 7 first, then 3
    assert tuple(rgba[0, 1]) == pytest.approx(to_rgba(CLASS_COLOURS[0], alpha=0.45))
    assert tuple(rgba[1, 0]) == pytest.approx(to_rgba(CLASS_COLOURS[1], alpha=0.45))
    assert tuple(rgba[0, 0]) == (0.0, 0.0, 0.0, 0.0)


def test_surface_metrics_read_a_crop_and_equal_monai_on_the_whole_masks():
    # NSD and HD95 crop both masks to the box around their union (plus MONAI's 1-voxel margin) before MONAI sees
    # them, and case_metrics computes the edge distances once for both: the values must be MONAI's on the whole
    # masks exactly -- masks on the borders, anisotropic spacing, 2D and 3D, edge voxels or subvoxel areas
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    rng = np.random.default_rng(1)
    for trial in range(16):
        shape = (30, 40) if trial % 2 else (12, 30, 25)
        pred, truth = _boxes_at_random(rng, shape, 1 + trial % 2), _boxes_at_random(rng, shape, 2)
        spacing = [float(s) for s in rng.choice([0.5, 1.0, 3.0], len(shape))]
        subvoxels = trial % 3 == 0
        whole = torch.from_numpy(pred)[None, None].float(), torch.from_numpy(truth)[None, None].float()
        expected_nsd = compute_surface_dice(*whole, class_thresholds=[2.0], include_background=True, spacing=spacing,
                                            use_subvoxels=subvoxels).item()
        expected_hd95 = compute_hausdorff_distance(*whole, include_background=True, percentile=95,
                                                   spacing=spacing).item()
        assert surface_dice(pred, truth, spacing, 2.0, subvoxels) == expected_nsd, trial
        assert hd95(pred, truth, spacing) == expected_hd95, trial
        both = case_metrics(pred, truth, spacing, 2.0, subvoxels)  # NSD and HD95 from one set of edge distances
        assert (both["nsd"], both["hd95"]) == (expected_nsd, expected_hd95), trial
    corner = np.zeros((9, 9), dtype=bool)
    corner[:3, :3] = True  # on two borders: the crop keeps no margin there, as MONAI pads none of its own
    assert hd95(corner, np.roll(corner, 6, axis=1), 1.0) == pytest.approx(6.0)


def test_counts_in_chunks_and_surface_boxes_of_large_label_values(monkeypatch):
    import medsam3_monai.metrics.segmentation as segmentation
    from medsam3_monai.metrics import label_map_metrics, label_overlaps

    generator = torch.Generator().manual_seed(5)
    pred = torch.randint(0, 6, (5, 17, 19), generator=generator, dtype=torch.int32)
    truth = torch.randint(0, 6, (5, 17, 19), generator=generator).to(torch.uint8)
    values = [1, 2, 3, 4, 5]
    one_by_one = [(int(((pred == v) & (truth == v)).sum()), int((pred == v).sum()), int((truth == v).sum()))
                  for v in values]
    whole = label_map_metrics(pred, truth, values, (2.0, 1.0, 1.0))
    monkeypatch.setattr(segmentation, "COUNT_CHUNK", 7)  # chunks that end inside rows, the last one short
    assert label_overlaps(pred, truth, values) == one_by_one  # joint histogram, chunk by chunk
    assert label_overlaps(pred, truth, values[:2]) == one_by_one[:2]  # value by value
    areas = [n for _, n, _ in one_by_one]
    assert segmentation.label_areas(pred, [*values, 0, 9]) == [*areas, int((pred == 0).sum()), 0]  # one histogram
    with monkeypatch.context() as patch:
        patch.setattr(segmentation, "MAX_JOINT_BINS", 3)  # values beyond a histogram: counted one by one
        assert segmentation.label_areas(pred, values) == areas
    assert dice(pred == 3, truth == 3) == pytest.approx(2 * one_by_one[2][0] / (one_by_one[2][1] + one_by_one[2][2]))
    monkeypatch.setattr(segmentation, "MAX_BOX_LABEL", 2)  # boxes from each value's masks instead of find_objects
    assert label_map_metrics(pred, truth, values, (2.0, 1.0, 1.0)) == whole


def test_the_radar_of_one_or_two_datasets_is_drawn_as_bars(tmp_path):
    """A radar needs three axes: with fewer datasets the chart is a bar chart (wider than tall), else the polar one."""
    from PIL import Image

    from medsam3_monai.metrics.plots import radar_chart

    records = [dict(r, protocol="top_query") for r in _records()]
    three = Image.open(radar_chart(aggregate(records), tmp_path / "three.png")).size
    one = Image.open(radar_chart(aggregate([r for r in records if r["dataset"] == "A"]), tmp_path / "one.png")).size
    assert three[0] == three[1] and one[0] > 2 * one[1]


def test_overlay_file_names_drop_a_hand_written_cases_image_extension():
    from medsam3_monai.engines.reports import _without_image_suffix

    assert _without_image_suffix("001_x.jpg") == "001_x" and _without_image_suffix("ct.NII.GZ") == "ct"
    assert _without_image_suffix("case.v2") == "case.v2" and _without_image_suffix("12") == "12"
    assert _without_image_suffix(".png") == ".png"  # nothing but an extension: kept


def test_many_classes_get_distinct_colours():
    """The first seven are the colour-blind-friendly set; beyond, golden-angle hues: the 117 TotalSegmentator classes
    get 117 different colours (they used to repeat the seven)."""
    from matplotlib.colors import to_rgb

    from medsam3_monai.metrics.plots import CLASS_COLOURS, class_colour

    colours = [class_colour(i) for i in range(117)]
    assert colours[:7] == list(CLASS_COLOURS) and len(set(colours)) == 117
    closest = min(sum((a - b) ** 2 for a, b in zip(to_rgb(x), to_rgb(y))) ** 0.5
                  for n, x in enumerate(colours[:40]) for y in colours[n + 1:40])
    assert closest > 0.05  # the first 40 are all visibly apart


def test_more_than_255_classes_keep_their_labels():
    """Channel c -> label c + 1 also past 255 (int32): class 300 must not wrap to 44."""
    from medsam3_monai.metrics.merge import merge_classes

    conf = torch.zeros(300, 1, 2)
    conf[299, 0, 0] = 1.0
    conf[0, 0, 1] = 1.0
    labels = merge_classes(conf)
    assert labels.dtype == torch.int32 and labels.tolist() == [[300, 1]]


@pytest.mark.parametrize("width, aspect, beside", [(60, 4.0, True), (100, 1.0, False), (200, 1.0, False)])
def test_an_overlays_legend_goes_beside_a_narrow_prediction_panel(monkeypatch, tmp_path, width, aspect, beside):
    """A volume slice of anisotropic voxels can be drawn much higher than wide: its legend then sits beside the
    prediction panel, not over it and past its edge; a wide panel keeps it inside."""
    from medsam3_monai.metrics import plots

    drawn = []
    monkeypatch.setattr(plots, "save_figure", lambda figure, path, rect=None: drawn.append(figure) or path)
    truth = np.zeros((140, width), np.int32)
    truth[20:60, 10:20], truth[80:120, 5:15] = 1, 2
    plots.overlay_figure(np.zeros((140, width), np.float32), truth, truth, tmp_path / "o.png", [1, 2],
                         names=["bright disc", "dark bar"], aspect=aspect)
    figure = drawn[0]
    figure.tight_layout()
    renderer = figure.canvas.get_renderer()
    panel = figure.axes[2]
    legend = panel.get_legend().get_window_extent(renderer)
    inside = panel.get_window_extent(renderer)
    assert (legend.x0 >= inside.x1) == beside
