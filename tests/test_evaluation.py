"""Evaluation: 2D protocols and the class merge at inference, the way back to the input geometry, and
`medsam3 evaluate` end to end on real samples (report files, MLflow run, two-checkpoint comparison, bad input)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from medsam3_monai.inferers.image import EMPTY_LOGIT, invert_to_input, protocol_logits, segment_image
from medsam3_monai.networks.outputs import MedSAM3Output

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "bundles" / "medsam3" / "configs"
S = 112


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------ constructed
def constructed_outputs(mask_logits: torch.Tensor, class_logits: torch.Tensor, presence: torch.Tensor,
                        semantic: torch.Tensor | None = None) -> MedSAM3Output:
    """Detector outputs with given last-layer masks (B, Q, h, w), class logits (B, Q) and presence (B,)."""
    batch, queries = class_logits.shape
    boxes = torch.zeros(1, batch, queries, 4)
    return MedSAM3Output(
        all_pred_logits=class_logits[None], all_pred_boxes=boxes, all_pred_boxes_cxcywh=boxes,
        all_presence_logits=presence.reshape(1, batch, 1), pred_masks=mask_logits,
        semantic_seg=semantic if semantic is not None else torch.zeros(batch, 1, *mask_logits.shape[-2:]),
        query_hidden_states=torch.zeros(batch, queries, 8),
    )


class StubNetwork(torch.nn.Module):
    """Returns fixed outputs and records the call (stands in for MedSAM3Net)."""

    def __init__(self, outputs: MedSAM3Output) -> None:
        super().__init__()
        self.outputs, self.calls = outputs, []
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, images, prompts, **kwargs):
        self.calls.append((tuple(images.shape), list(prompts), kwargs))
        return self.outputs


def logit(p: float) -> float:
    return float(torch.logit(torch.tensor(p)))


def test_overlapping_classes_go_to_the_prompt_with_the_higher_score_times_mask_probability():
    # 1 x 3 "image" of mask logits per prompt (2 queries each; query 0 is the top one of both prompts)
    # pixel 0: only A claims it; pixel 1: both, A more confident; pixel 2: both, B more confident although
    # A's detector score is higher: the merge is pixel-wise, not by prompt score
    a_top = torch.tensor([[3.0, 2.0, 0.1]])
    b_top = torch.tensor([[-5.0, 4.0, 10.0]])
    masks = torch.stack([torch.stack([a_top, -a_top]), torch.stack([b_top, -b_top])])  # (2, 2, 1, 3)
    presence = torch.tensor([logit(0.9999), logit(0.9999)])
    class_logits = torch.tensor([[logit(0.9), logit(0.1)], [logit(0.5), logit(0.2)]])
    network = StubNetwork(constructed_outputs(masks, class_logits, presence))

    seg = segment_image(network, torch.zeros(3, 1, 3), ["A", "B"])

    assert len(network.calls) == 1 and network.calls[0][1] == ["A", "B"]  # one forward for both prompts
    assert torch.allclose(seg.scores, torch.tensor([0.9, 0.5]), atol=1e-3)
    conf_a = 0.9 * torch.sigmoid(a_top)
    conf_b = 0.5 * torch.sigmoid(b_top)
    assert conf_a[0, 1] > conf_b[0, 1] and conf_b[0, 2] > conf_a[0, 2]  # the construction does what it says
    assert seg.label_map().tolist() == [[1, 1, 2]]
    assert seg.masks.tolist() == [[[True, True, True]], [[False, True, True]]]


def test_evaluator_merges_classes_in_the_input_geometry_and_scores_each_label_value():
    from monai.data import MetaTensor

    from medsam3_monai.engines.evaluation import CaseInferer, case_records
    from medsam3_monai.transforms import ResizeToSliced

    # native image 3 x 6, slice space 6 x 6; every row of a prompt's logits is the same, so inversion keeps them
    a_row = torch.tensor([3.0, 3.0, 2.0, 0.1, -5.0, -5.0])  # score 0.9: wins column 2 (0.9 σ(2) > 0.5 σ(4))
    b_row = torch.tensor([-5.0, -5.0, 4.0, 10.0, 3.0, 3.0])  # score 0.5: wins column 3 (0.5 σ(10) > 0.9 σ(0.1))
    masks = torch.stack([torch.stack([r.expand(6, 6), -r.expand(6, 6)]) for r in (a_row, b_row)])
    class_logits = torch.tensor([[logit(0.9), logit(0.1)], [logit(0.5), logit(0.2)]])
    network = StubNetwork(constructed_outputs(masks, class_logits, torch.tensor([logit(0.9999)] * 2)))
    resize = ResizeToSliced(keys="image", spatial_size=6)
    truth = torch.tensor([[3, 3, 0, 7, 7, 0]], dtype=torch.uint8).expand(3, 6)[None]
    item = resize({"image": MetaTensor(torch.zeros(3, 3, 6)), "label": MetaTensor(truth.clone()),
                   "prompts": {"3": "A", "7": "B"}, "dataset": "X", "group": "internal", "case": "c"})

    prediction = CaseInferer(resize)([item], network)

    assert prediction.pred.tolist() == [[3, 3, 3, 7, 7, 7]] * 3  # label values, in the native 3 x 6 geometry
    records = case_records(prediction, "top_query")
    assert [(r["prompt"], r["label"]) for r in records] == [("A", 3), ("B", 7)]
    assert [r["metrics"]["dice"] for r in records] == pytest.approx([0.8, 0.8])  # 2·2 / (3 + 2) per row
    assert [r["metrics"]["iou"] for r in records] == pytest.approx([2 / 3, 2 / 3])


def test_threshold_protocol_unites_every_query_above_the_score_and_semantic_reads_the_head():
    masks = torch.full((1, 3, 1, 4), -1.0)
    masks[0, 0, 0, 0] = masks[0, 1, 0, 1] = masks[0, 2, 0, 2] = 5.0
    class_logits = torch.tensor([[logit(0.8), logit(0.6), logit(0.3)]])
    semantic = torch.tensor([[[[1.0, -1.0, -1.0, 2.0]]]])
    outputs = constructed_outputs(masks, class_logits, torch.tensor([logit(0.99999)]), semantic)

    union, score = protocol_logits(outputs, (1, 4), "threshold", score_threshold=0.5)
    assert (union > 0).tolist() == [[[True, True, False, False]]] and score.item() == pytest.approx(0.8, abs=1e-3)
    top, _ = protocol_logits(outputs, (1, 4), "top_query")
    assert (top > 0).tolist() == [[[True, False, False, False]]]
    none_kept, best = protocol_logits(outputs, (1, 4), "threshold", score_threshold=0.95)
    assert (none_kept == EMPTY_LOGIT).all() and best.item() == pytest.approx(0.8 * 0.99999)  # the best query's
    head, presence = protocol_logits(outputs, (1, 4), "semantic")
    assert (head > 0).tolist() == [[[True, False, False, True]]]
    assert presence.item() == pytest.approx(0.99999, abs=1e-7)  # sigmoid(presence), not a query's score
    with pytest.raises(ValueError, match="unknown protocol"):
        protocol_logits(outputs, (1, 4), "best")


def test_threshold_protocol_keeps_a_score_equal_to_the_threshold():
    masks = torch.full((1, 2, 1, 4), -1.0)
    masks[0, 0, 0, 1] = 5.0
    outputs = constructed_outputs(masks, torch.tensor([[0.0, -3.0]]), torch.tensor([100.0]))
    assert outputs.scores[0, 0].item() == 0.5  # sigmoid(0) x sigmoid(100): exactly 0.5 in float32
    union, score = protocol_logits(outputs, (1, 4), "threshold", score_threshold=0.5)
    assert (union > 0).tolist() == [[[False, True, False, False]]] and score.item() == 0.5  # score >= threshold


def test_top_query_floor_empties_a_prompt_whose_best_query_scores_below_the_floor():
    """The Medical-SAM3 release's 2D evaluation: the best query above 0.1, else no mask (Dice 0 there)."""
    masks = torch.full((2, 2, 1, 4), -1.0)
    masks[:, 0, 0, 0] = masks[:, 1, 0, 3] = 5.0
    class_logits = torch.tensor([[logit(0.3), logit(0.2)], [logit(0.08), logit(0.05)]])
    outputs = constructed_outputs(masks, class_logits, torch.tensor([100.0, 100.0]))
    floor, scores = protocol_logits(outputs, (1, 4), "top_query_floor", score_threshold=0.1)
    top, top_scores = protocol_logits(outputs, (1, 4), "top_query")
    assert (top > 0).tolist() == [[[True, False, False, False]]] * 2
    assert (floor[0] > 0).tolist() == [[True, False, False, False]] and (floor[1] == EMPTY_LOGIT).all()
    assert torch.equal(scores, top_scores) and scores.tolist() == pytest.approx([0.3, 0.08], abs=1e-6)


def test_slice_space_maps_go_back_to_the_image_size_with_invertd():
    from monai.data import MetaTensor

    from medsam3_monai.transforms import ResizeToSliced

    truth = torch.zeros(1, 45, 70)
    truth[0, 10:30, 20:60] = 1
    resize = ResizeToSliced(keys=("image", "label"), spatial_size=S, mode=("bilinear", "bilinear"),
                            anti_aliasing=False)
    item = resize({"image": MetaTensor(truth.repeat(3, 1, 1)), "label": MetaTensor(truth.clone())})
    logits = item["label"].as_tensor() * 20 - 10  # slice-space "logits" of the truth

    back = invert_to_input(logits, item, resize)

    assert tuple(back.shape) == (1, 45, 70)
    agreement = ((back.as_tensor() > 0) == truth.bool()).float().mean()
    assert agreement > 0.99


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def datalists(shared_data, tmp_path_factory) -> dict[str, Path]:
    """Datalists of three real samples: Kvasir-SEG (RGB JPEG), chest X-ray (grey), hippocampus (3D NIfTI)."""
    from medsam3_monai.data import build_datalist, write_datalist

    folder = tmp_path_factory.mktemp("datalists")
    out = {}
    for key, name in (("kvasir", "Kvasir-SEG_sample"), ("chest", "ChestXray_lung_sample"),
                      ("hippocampus", "MSD_Task04_Hippocampus_cropped")):
        result = build_datalist(name, shared_data / name, check_values=key != "hippocampus")
        out[key] = write_datalist(result.datalist, folder / f"{key}.json")
    return out


def evaluate(*argv: str) -> int:
    from medsam3_monai.deploy.cli import main

    return main(["evaluate", *argv, "--no-progress"])


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_medsam3_evaluate_writes_every_report_and_an_mlflow_run(datalists, tmp_path, capsys):
    from mlflow import MlflowClient

    out = tmp_path / "report"
    rc = evaluate("--datalist", str(datalists["kvasir"]), "--datalist", str(datalists["chest"]),
                  "--datalist", str(datalists["hippocampus"]), "--checkpoint", "tiny", "--out", str(out),
                  "--max-cases", "1", "--image-size", str(S), "--score-threshold", "0.2", "--overlays", "3",
                  "--resize-kernel", "monai")
    assert rc == 0, capsys.readouterr().err

    cases = read_csv(out / "cases.csv")
    assert [(c["dataset"], c["prompt"]) for c in cases] == [
        ("Kvasir-SEG", "polyp"), ("ChestXray_lung_sample", "lung"),
        ("MSD_Task04_Hippocampus", "anterior hippocampus"), ("MSD_Task04_Hippocampus", "posterior hippocampus"),
    ]
    assert {c["protocol"] for c in cases} == {"top_query"} and all(c["group"] == "internal" for c in cases)
    assert all(0.0 <= float(c["dice"]) <= 1.0 and 0.0 <= float(c["iou"]) <= float(c["dice"]) for c in cases)
    assert all(c["nsd"] == "" for c in cases[:2]) and all(c["nsd"] != "" for c in cases[2:])  # spacing: 3D only

    table = {row["name"]: row for row in read_csv(out / "table.csv")}
    assert set(table) == {"Kvasir-SEG", "ChestXray_lung_sample", "MSD_Task04_Hippocampus", "internal", "overall"}
    hippocampus = [float(c["dice"]) for c in cases[2:]]
    assert float(table["MSD_Task04_Hippocampus"]["dice"]) == pytest.approx(sum(hippocampus) / 2)
    markdown = (out / "table.md").read_text()
    assert "| Dataset | Group | n | Dice (%) | IoU (%) | NSD (%) | HD95 (mm) |" in markdown
    assert "protocol: top_query" in markdown and "Volumes (1, protocol `top_query`)" in markdown
    assert (out / "radar.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    overlays = sorted(p.name for p in (out / "overlays").glob("*.png"))
    assert len(overlays) == 3 and any("Hippocampus" in name for name in overlays)

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlruns.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("medsam3-evaluate").experiment_id])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["checkpoint"] == "tiny" and params["protocol"] == "top_query" and params["image_size"] == str(S)
    assert params["resize_kernel"] == "monai"
    assert (params["autocast"], params["compiled"]) == ("none", "False")  # how the network ran (segment's sidecars)
    assert json.loads(params["datalists"]) == [str(Path(p).resolve()) for p in datalists.values()]
    metrics = run.data.metrics
    assert metrics["Kvasir-SEG/dice"] == pytest.approx(float(table["Kvasir-SEG"]["dice"]))
    assert metrics["group/internal/iou"] == pytest.approx(float(table["internal"]["iou"]))
    assert "MSD_Task04_Hippocampus/hd95" in metrics or float(table["MSD_Task04_Hippocampus"]["hd95_n"] or 0) == 0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"cases.csv", "table.csv", "table.md", "radar.png", "overlays"} <= artifacts


@pytest.mark.slow
def test_two_checkpoints_give_side_by_side_tables_with_deltas(datalists, tmp_path, capsys):
    from medsam3_monai.networks import MedSAM3Net, save_checkpoint_file

    other = save_checkpoint_file(MedSAM3Net("tiny", seed=1).sam3, tmp_path / "tiny_seed1.pt")
    out = tmp_path / "compare"
    rc = evaluate("--datalist", str(datalists["kvasir"]), "--datalist", str(datalists["chest"]),
                  "--checkpoint", "tiny", "--checkpoint", str(other), "--out", str(out), "--split", "all",
                  "--max-cases", "2", "--overlays", "0")
    assert rc == 0, capsys.readouterr().err

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlruns.db'}")
    runs = client.search_runs([client.get_experiment_by_name("medsam3-evaluate").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]  # the run holding the deltas
    assert parent.data.params["checkpoint"] == "tiny" and parent.data.params["checkpoint_b"] == str(other)
    assert (parent.data.params["label_a"], parent.data.params["label_b"]) == ("tiny", "tiny_seed1")
    # how both were scored, as each child run has it (no volumes: no volume threshold)
    assert (parent.data.params["protocol"], parent.data.params["score_threshold"]) == ("top_query", "0.5")
    assert (parent.data.params["autocast"], parent.data.params["compiled"]) == ("none", "False")
    assert "volume_score_threshold" not in parent.data.params
    assert "Kvasir-SEG/dice_delta" in parent.data.metrics and len(runs) == 3
    rows = {row["name"]: row for row in read_csv(out / "comparison.csv")}
    assert set(rows) == {"Kvasir-SEG", "ChestXray_lung_sample", "internal", "overall"}
    assert all((row["a"], row["b"]) == ("tiny", "tiny_seed1") for row in rows.values())
    for label, column in (("tiny", "dice_a"), ("tiny_seed1", "dice_b")):
        own = {row["name"]: row for row in read_csv(out / label / "table.csv")}
        assert all(float(rows[name][column]) == pytest.approx(float(own[name]["dice"])) for name in rows)
    for row in rows.values():
        for metric in ("dice", "iou"):
            a, b, delta = (float(row[f"{metric}_{k}"]) for k in ("a", "b", "delta"))
            assert delta == pytest.approx(b - a)
    assert any(abs(float(r["dice_delta"])) > 1e-6 for r in rows.values())  # two different networks
    markdown = (out / "comparison.md").read_text()
    assert "Dice (%) tiny" in markdown and "Dice (%) tiny_seed1" in markdown and "Δ Dice" in markdown
    assert f"\nCheckpoints: tiny = `tiny`; tiny_seed1 = `{other}`\n" in markdown


def test_bad_input_exits_non_zero_with_a_clear_message_and_no_output(datalists, tmp_path, capsys):
    out = tmp_path / "never"
    kvasir = str(datalists["kvasir"])
    garbage = tmp_path / "broken.pt"
    garbage.write_bytes(b"not a checkpoint")
    cases = [
        (["--datalist", str(tmp_path / "missing.json"), "--checkpoint", "tiny"], "missing.json not found"),
        (["--datalist", kvasir, "--checkpoint", str(garbage)], "cannot read checkpoint"),
        (["--datalist", kvasir, "--checkpoint", "tiny", "--split", "test"], "has no test cases"),
        (["--datalist", kvasir, "--checkpoint", "tiny", "--image-size", "100"], "multiple of 14"),
    ]
    for argv, message in cases:
        assert evaluate(*argv, "--out", str(out)) == 2
        err = capsys.readouterr().err
        assert "medsam3 evaluate: error:" in err and message in err, err
        assert not out.exists()
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    assert evaluate("--datalist", kvasir, "--checkpoint", "tiny", "--out", str(occupied)) == 2
    assert "not an empty folder" in capsys.readouterr().err and sorted(occupied.iterdir()) == [occupied / "keep.txt"]
    with pytest.raises(SystemExit) as stop:  # an argument's type: argparse's usage error, before anything loads
        evaluate("--datalist", kvasir, "--checkpoint", "tiny", "--out", str(out), "--num-workers", "-1")
    assert stop.value.code == 2 and "--num-workers" in capsys.readouterr().err and not out.exists()


def test_bad_cases_stop_with_one_line_also_from_loader_workers(datalists, tmp_path, capsys):
    """An input error met in a DataLoader worker (--num-workers 1) ends the run as in the main process: one line,
    exit 2; a malformed item is named before anything runs; an item without 'case' is named by its file."""
    chest = json.loads(Path(datalists["chest"]).read_text())
    first = (chest["validation"] or chest["training"])[0]
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(Path(first["image"]).read_bytes()[:2000])
    variants = {
        "truncated": (dict(first, image=str(truncated)), "cannot be read as an image"),
        "prompts as a list": (dict(first, prompts=["lung"]), "'prompts' is a list"),
        "no label": ({k: v for k, v in first.items() if k != "label"}, "test item 2 has no 'label' path"),
    }
    for name, (item, words) in variants.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"training": [], "validation": [], "test": [first, item]}))
        out = tmp_path / f"out {name}"
        assert evaluate("--datalist", str(path), "--checkpoint", "tiny", "--out", str(out), "--no-mlflow",
                        "--num-workers", "1") == 2, name
        err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert len(err) == 1 and "medsam3 evaluate: error:" in err[0] and words in err[0], (name, err)
        assert "Traceback" not in err[0] and not out.exists()
    unnamed = tmp_path / "unnamed.json"
    unnamed.write_text(json.dumps({"training": [], "validation": [],
                                   "test": [{k: v for k, v in first.items() if k != "case"}]}))
    out = tmp_path / "unnamed"
    assert evaluate("--datalist", str(unnamed), "--checkpoint", "tiny", "--out", str(out), "--no-mlflow") == 0
    rows = (out / "cases.csv").read_text().splitlines()
    assert len(rows) == 2 and f",{Path(first['image']).name}," in rows[1], rows


def test_auto_split_takes_test_when_present_else_validation(tmp_path):
    from medsam3_monai.data.selection import evaluation_items

    def datalist(name: str, test: int) -> Path:
        item = {"label": "y.png", "dataset": "Kvasir-SEG", "prompts": {"1": "polyp"}}
        path = tmp_path / name

        def case(case: str) -> dict:
            return dict(item, case=case, image=f"{name}-{case}.png")

        path.write_text(json.dumps({"training": [case("t")], "validation": [case("v")],
                                    "test": [case(f"x{i}") for i in range(test)]}))
        return path

    with_test, without = datalist("a.json", 3), datalist("b.json", 0)
    items = evaluation_items([with_test, without], check_files=False)
    assert [(i["case"], i["split"]) for i in items] == [("x0", "test"), ("x1", "test"), ("x2", "test"),
                                                        ("v", "validation")]
    every = ["t", "v", "x0", "x1", "x2"]
    sampled = [[i["case"] for i in evaluation_items([with_test], "all", max_cases=2, check_files=False, seed=seed)]
               for seed in range(6)]
    assert all(len(s) == 2 and s == sorted(s, key=every.index) for s in sampled)  # kept in file order
    assert sampled[0] == [i["case"] for i in evaluation_items([with_test], "all", 2, check_files=False, seed=0)]
    assert len({tuple(s) for s in sampled}) > 1  # a seeded sample, not the first N
    assert {i["group"] for i in items} == {"internal"}  # from the catalogue
    with pytest.raises(ValueError, match="has no test cases"):
        evaluation_items([without], "test", check_files=False)
    misnamed = tmp_path / "misnamed.json"  # a split key misspelt: named in the error
    misnamed.write_text(json.dumps({"training": [], "valid": [{"image": "v.png", "label": "v.png"}]}))
    with pytest.raises(ValueError, match=r"its lists \['valid'\] are not splits"):
        evaluation_items([misnamed], check_files=False)
    with pytest.warns(UserWarning, match="a.json-x0.png is evaluated twice"):
        assert len(evaluation_items([with_test, with_test], check_files=False)) == 6
    nameless = tmp_path / "my_cases.json"  # items without 'dataset': reported under the datalist's name
    nameless.write_text(json.dumps({"training": [], "validation": [],
                                    "test": [{"image": "z.png", "label": "y.png", "prompts": {"1": "polyp"}}]}))
    assert [i["dataset"] for i in evaluation_items([nameless], check_files=False)] == ["my_cases"]
    twice = tmp_path / "twice.json"  # one image under two datasets of one datalist: both means count it once
    item = {"image": "z.png", "label": "y.png", "prompts": {"1": "polyp"}}
    twice.write_text(json.dumps({"training": [], "validation": [],
                                 "test": [dict(item, dataset="A"), dict(item, dataset="B")]}))
    with pytest.warns(UserWarning, match=r"z.png is evaluated twice \(in .*twice.json, twice\), as A and as B"):
        evaluation_items([twice], check_files=False)
    five = tmp_path / "five.json"  # one image with five annotators' masks: said once, with its count
    five.write_text(json.dumps({"test": [dict(item, dataset="A", case=f"r{n}", label=f"y{n}.png") for n in range(5)]}))
    with pytest.warns(UserWarning) as said:
        evaluation_items([five], check_files=False)
    repeated = [str(w.message) for w in said if "is evaluated" in str(w.message)]
    assert len(repeated) == 1 and "z.png is evaluated 5 times (in " in repeated[0], repeated
    one_case = tmp_path / "one_case.json"  # two images under one case id: their report rows would look alike
    one_case.write_text(json.dumps({"test": [dict(item, dataset="A", case="c4"),
                                             dict(item, dataset="A", case="c4", image="w.png")]}))
    with pytest.warns(UserWarning, match=r"case 'c4' of A names two images \(.*z.png and .*w.png\)"):
        evaluation_items([one_case], check_files=False)


def test_validation_dice_is_the_mean_over_prompts_with_a_target():
    """The best-checkpoint metric: prompt 0 exact (Dice 1), prompt 1 half its target (2 x 2 / (2 + 4)), prompt 2
    negative (no target; its mask is not counted): (1 + 2/3) / 2."""
    from medsam3_monai.engines import PromptDice
    from medsam3_monai.losses import FindTargets

    truth = torch.zeros(3, 4, 4, dtype=torch.bool)
    truth[0, 0, :2] = True
    truth[1, 1, :] = True
    predicted = torch.full((3, 1, 4, 4), -5.0)  # one query per prompt, logits > 0 where it claims
    predicted[0, 0, 0, :2] = predicted[1, 0, 1, :2] = predicted[2, 0, 2:, :] = 5.0
    outputs = constructed_outputs(predicted, torch.zeros(3, 1), torch.zeros(3))
    box = torch.tensor([[0.5, 0.5, 0.5, 0.5]])
    targets = FindTargets.from_instances([box, box, torch.zeros(0, 4)], [truth[:1], truth[1:2], truth[:0]])
    metric = PromptDice()
    metric.update((outputs, targets))
    assert metric.compute() == pytest.approx((1 + 2 / 3) / 2)


def test_case_records_keep_each_prompts_label_score_and_group():
    from medsam3_monai.engines.evaluation import CasePrediction, case_records

    pred = torch.tensor([[3, 3, 0, 7]], dtype=torch.uint8)
    truth = torch.tensor([[3, 0, 0, 7]], dtype=torch.uint8)
    prediction = CasePrediction([{"dataset": "X", "group": "external", "case": "c1"}], [3, 7], ["A", "B"], pred,
                                truth, torch.tensor([0.9, 0.2]), None)
    records = case_records(prediction, "top_query")
    assert [(r["prompt"], r["label"], r["group"]) for r in records] == [("A", 3, "external"), ("B", 7, "external")]
    assert [r["score"] for r in records] == pytest.approx([0.9, 0.2])
    assert [r["metrics"]["dice"] for r in records] == pytest.approx([2 / 3, 1.0])  # A: 2 x 1 / (2 + 1)


def test_label_map_of_writes_each_mask_as_its_label_value_in_order():
    from medsam3_monai.engines.evaluation import label_map_of

    a, b = torch.tensor([[True, True, False]]), torch.tensor([[False, True, True]])
    assert label_map_of([a, b], [3, 7]).tolist() == [[3, 7, 7]]  # where they overlap, the one written last
    assert label_map_of([a, b], [3, 7], order=[1, 0]).tolist() == [[3, 3, 7]]


def test_the_agents_answers_overlap_to_the_higher_score_and_the_earlier_prompt_on_a_tie():
    from medsam3_monai.engines.evaluation import highest_score_last, label_map_of

    scores = [0.5, 0.9, 0.5]
    assert highest_score_last(scores) == [2, 0, 1]
    claims = [torch.tensor([[True, True, False, True]]), torch.tensor([[False, True, False, False]]),
              torch.tensor([[True, True, True, True]])]
    labels = label_map_of(claims, [3, 7, 9], highest_score_last(scores))
    assert labels.tolist() == [[3, 7, 9, 3]]  # 7 where it claims (0.9); 3 over 9 where both claim (0.5 each)


def test_cli_choices_are_the_engine_choices():
    from medsam3_monai.data.selection import SPLIT_CHOICES
    from medsam3_monai.deploy import evaluate_cli
    from medsam3_monai.deploy.cli import build_parser
    from medsam3_monai.engines import PromptDice
    from medsam3_monai.protocol_registry import PROTOCOLS

    assert evaluate_cli.SPLIT_CHOICES == SPLIT_CHOICES
    subcommands = build_parser()._subparsers._group_actions[0].choices
    for command in ("evaluate", "segment", "demo"):
        protocol = next(a for a in subcommands[command]._actions if a.dest == "protocol")
        assert list(protocol.choices) == list(PROTOCOLS), command
    assert PromptDice("semantic").protocol is PROTOCOLS["semantic"]
    with pytest.raises(ValueError, match="choose from top_query, semantic"):
        PromptDice("threshold")  # not a validation metric


@pytest.mark.slow
def test_evaluate_bundle_runs_with_monai_bundle(datalists, tmp_path):
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=[str(CONFIGS / "inference.json"), str(CONFIGS / "evaluate.json")],
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"), workflow_type="infer", bundle_root=str(tmp_path / "bundle"),
        datalists=[str(datalists["kvasir"])], checkpoint="tiny", max_cases=1, max_overlays=1, mlflow=False,
        protocol="threshold", box_prompts=True,
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()

    report = tmp_path / "bundle" / "eval"
    cases = read_csv(report / "cases.csv")
    assert len(cases) == 1 and cases[0]["protocol"] == "threshold+box"
    assert {"table.md", "table.csv", "radar.png"} <= {p.name for p in report.iterdir()}
    assert len(list((report / "overlays").glob("*.png"))) == 1


def test_evaluate_runs_the_network_under_bf16_autocast_and_a_compiled_encoder(datalists, tmp_path, monkeypatch,
                                                                               capsys, dynamo_counters):
    """``medsam3 evaluate --autocast bf16 --compile --batch-size 2``: every forward runs under bf16 autocast, the
    vision encoder compiled once (a smaller last batch is padded to 2 images), and the report is written."""
    from medsam3_monai.networks import MedSAM3Net

    seen = []
    encode = MedSAM3Net.encode_images

    def recording(self, pixel_values):
        seen.append((pixel_values.shape[0], torch.is_autocast_enabled("cpu")))
        return encode(self, pixel_values)

    monkeypatch.setattr(MedSAM3Net, "encode_images", recording)
    out = tmp_path / "report"
    rc = evaluate("--datalist", str(datalists["kvasir"]), "--datalist", str(datalists["chest"]),
                  "--checkpoint", "tiny", "--out", str(out), "--image-size", str(S), "--no-mlflow",
                  "--overlays", "0", "--batch-size", "2", "--autocast", "bf16", "--compile")
    assert dynamo_counters["stats"]["unique_graphs"] == 1 and dynamo_counters["frames"]["ok"] >= 1
    assert rc == 0, capsys.readouterr().err
    assert "medsam3 evaluate: --compile: the vision encoder compiles at the first batch" in capsys.readouterr().err
    cases = read_csv(out / "cases.csv")
    assert sum(count for count, _ in seen) == len({c["case"] for c in cases})  # each picture through the network
    assert max(count for count, _ in seen) == 2 and all(autocast for _, autocast in seen)  # batches of 2, bf16
    assert all(0.0 <= float(c["dice"]) <= 1.0 for c in cases)
    assert "The network ran under bf16 autocast" in (out / "table.md").read_text()  # the report says how it ran


def test_a_batch_of_cases_scores_as_one_case_at_a_time(datalists, tiny_net):
    """``CaseInferer.infer_cases`` (the engine's batched entry, ``medsam3 evaluate --batch-size``): the 2D cases go
    through shared forwards, a volume alone; each case's label map and records are those of one-by-one calls."""
    from medsam3_monai.engines.evaluation import CaseInferer, case_records, evaluation_items, evaluation_transforms
    from medsam3_monai.networks.tracker import build_tracker

    items = evaluation_items([datalists["kvasir"], datalists["chest"], datalists["hippocampus"]], "all")
    items = [items[0], items[1], *[i for i in items if "Hippocampus" in i["dataset"]][:1], items[2]]
    transform = evaluation_transforms(tiny_net.image_size)
    cases = [transform(item) for item in items]
    tracker = build_tracker("tiny", detector=tiny_net)
    for box_prompts in (False, True):
        inferer = CaseInferer(transform, score_threshold=0.2, box_prompts=box_prompts, tracker=tracker)
        batches = []
        hook = tiny_net.register_forward_hook(lambda module, args, output: batches.append(args[0].shape[0]))
        try:
            with torch.no_grad():
                together = inferer.infer_cases(cases, tiny_net)
        finally:
            hook.remove()
        assert batches[-1] == 3, batches  # the three 2D images in one forward, after the volume
        with torch.no_grad():
            alone = [inferer(case, tiny_net) for case in cases]
        assert [p.pred.ndim for p in together] == [2, 2, 3, 2]
        for ours, reference in zip(together, alone):
            assert ours.pred.shape == reference.pred.shape and ours.values == reference.values
            assert (ours.pred != reference.pred).float().mean() < 1e-4  # a pixel at the threshold may flip
            assert torch.allclose(ours.scores, reference.scores, atol=1e-5)
            dice = [r["metrics"]["dice"] for r in case_records(ours, inferer.label)]
            assert dice == pytest.approx([r["metrics"]["dice"] for r in case_records(reference, inferer.label)],
                                         abs=1e-3)


def test_a_new_experiment_in_a_given_sqlite_store_keeps_artifacts_beside_it(tmp_path, monkeypatch):
    """``--tracking-uri sqlite:///...``: artifacts go beside the database, not to ./mlruns of the working folder."""
    from medsam3_monai.engines.reports import open_experiment

    monkeypatch.chdir(tmp_path)
    (tmp_path / "store").mkdir()
    client, experiment_id = open_experiment(f"sqlite:///{tmp_path / 'store' / 'ml.db'}", "mine")
    location = client.get_experiment(experiment_id).artifact_location
    assert Path(location.removeprefix("file://")) == tmp_path / "store" / "mlartifacts"
    assert not (tmp_path / "mlruns").exists()


def test_checkpoints_of_one_name_are_labelled_by_the_folder_where_their_paths_part(tmp_path, capsys):
    from medsam3_monai.deploy.evaluate_cli import checkpoint_labels

    for run in ("runA", "runB"):
        (tmp_path / run / "checkpoints").mkdir(parents=True)
        (tmp_path / run / "checkpoints" / "model_best_val_dice.pt").touch()
        (tmp_path / run / "bundle" / "models").mkdir(parents=True)
    best = [str(tmp_path / run / "checkpoints" / "model_best_val_dice.pt") for run in ("runA", "runB")]
    assert checkpoint_labels(best) == ["runA-model_best_val_dice", "runB-model_best_val_dice"]
    bundles = [str(tmp_path / run / "bundle" / "models" / "model.pt") for run in ("runA", "runB")]
    assert checkpoint_labels(bundles) == ["runA-bundle", "runB-bundle"]
    assert checkpoint_labels([best[0], bundles[1]]) == ["model_best_val_dice", "bundle"]
    assert checkpoint_labels(["tiny", "tiny"]) == ["tiny-1", "tiny-2"]
    (tmp_path / "tiny" / "models").mkdir(parents=True)  # the tiny recipe's bundle_root against the preset
    (tmp_path / "tiny" / "models" / "model.pt").touch()
    assert checkpoint_labels(["tiny", str(tmp_path / "tiny" / "models" / "model.pt")]) == ["tiny", "tiny-model"]
    assert checkpoint_labels(["tiny", str(tmp_path / "tiny")]) == ["tiny", f"{tmp_path.name}-tiny"]
    assert checkpoint_labels([best[0], best[0]]) == ["model_best_val_dice-1", "model_best_val_dice-2"]
    from medsam3_monai.deploy.cli import build_parser
    from medsam3_monai.deploy.evaluate_cli import _check_studies

    plain = build_parser().parse_args(["evaluate", "--datalist", "d.json", "--out", "o", "--checkpoint", "tiny"])
    _check_studies(plain, ["tiny", "tiny"])
    assert "both --checkpoint give tiny: the comparison is of a network with itself" in capsys.readouterr().err
    _check_studies(plain, [best[0], str(Path(best[0]).parent / ".." / "checkpoints" / Path(best[0]).name)])
    assert "both --checkpoint give" in capsys.readouterr().err
    _check_studies(plain, best)
    assert capsys.readouterr().err == ""


def test_skip_empty_truth_is_the_2d_rule_and_leaves_volume_rows_scored(tmp_path):
    """The release skips 2D images without foreground; a volume's empty-truth rows (an organ absent from a CT)
    stay scored (they were dropped too, changing a mixed run's 3D numbers)."""
    from medsam3_monai.engines.reports import EvaluationReport

    report = EvaluationReport(tmp_path, mlflow=False, skip_empty_truth=True)
    report.records = [{"case": "a.png", "empty_truth": True, "volume": False},
                      {"case": "a.png", "empty_truth": False, "volume": False},
                      {"case": "ct.nii.gz", "empty_truth": True, "volume": True}]
    scored, skipped = report.scored_records()
    assert [r["case"] for r in scored] == ["a.png", "ct.nii.gz"] and skipped == [report.records[0]]


def test_skip_empty_truth_leaves_rows_without_foreground_out_of_the_tables(shared_data, tmp_path, capsys):
    """``--skip-empty-truth``: the Medical-SAM3 release's 2D evaluation skips images without foreground. The
    rows of such cases leave cases.csv and the tables (listed in skipped_empty_truth.csv, said under the table);
    by default they are scored. With ``top_query_floor`` at 0.1 this is the release's rule set."""
    import numpy as np
    from PIL import Image

    from medsam3_monai.data import build_datalist, write_datalist

    datalist = build_datalist("Kvasir-SEG_sample", shared_data / "Kvasir-SEG_sample").datalist
    item, other = (dict(i) for i in datalist["training"][:2])
    empty = tmp_path / "empty_mask.png"  # the other picture, with a mask of no foreground
    Image.fromarray(np.zeros(np.asarray(Image.open(other["label"])).shape[:2], dtype=np.uint8)).save(empty)
    items = [item, dict(other, label=str(empty), case="no foreground")]
    path = write_datalist({"training": [], "validation": [], "test": items}, tmp_path / "d.json")
    common = ["--datalist", str(path), "--checkpoint", "tiny", "--image-size", str(S), "--no-mlflow",
              "--overlays", "0", "--protocol", "top_query_floor", "--score-threshold", "0.1"]

    assert evaluate(*common, "--out", str(tmp_path / "all")) == 0
    assert len(read_csv(tmp_path / "all" / "cases.csv")) == 2
    assert not (tmp_path / "all" / "skipped_empty_truth.csv").exists()
    assert evaluate(*common, "--skip-empty-truth", "--out", str(tmp_path / "skip")) == 0, capsys.readouterr().err
    out = tmp_path / "skip"
    (scored,) = read_csv(out / "cases.csv")
    assert scored["case"] == item["case"] and scored["protocol"] == "top_query_floor"
    assert read_csv(out / "skipped_empty_truth.csv") == [
        {"dataset": "Kvasir-SEG", "case": "no foreground", "prompt": "polyp", "label": "1"}]
    table = {row["name"]: row for row in read_csv(out / "table.csv")}
    assert table["Kvasir-SEG"]["n"] == "1"
    assert float(table["Kvasir-SEG"]["dice"]) == pytest.approx(float(scored["dice"]))
    markdown = (out / "table.md").read_text()
    assert "1 of 2 (case, prompt) rows have an empty truth and are left out" in markdown
    assert "empty when its score is below 0.1" in markdown  # the protocol's description, with its floor


def test_volume_score_threshold_sets_the_volumes_detection_threshold_apart(datalists, tmp_path, capsys):
    """``--volume-score-threshold``: the release's rules for a run of pictures and volumes (2D floor 0.1, 3D
    detection 0.5) in one go. Here the pictures' floor is 0 (their top query's mask is kept) and the volumes'
    threshold 0.99, above every slice of the tiny network (~0.25): the volume's masks are empty, the picture's not,
    and the notes and MLflow parameters say which threshold did what."""
    out = tmp_path / "mixed"
    rc = evaluate("--datalist", str(datalists["kvasir"]), "--datalist", str(datalists["hippocampus"]),
                  "--checkpoint", "tiny", "--image-size", str(S), "--max-cases", "1", "--overlays", "0", "--no-mlflow",
                  "--protocol", "top_query_floor", "--score-threshold", "0", "--volume-score-threshold", "0.99",
                  "--out", str(out))
    assert rc == 0, capsys.readouterr().err
    cases = read_csv(out / "cases.csv")
    assert [(c["dataset"], c["protocol"]) for c in cases] == [
        ("Kvasir-SEG", "top_query_floor"), ("MSD_Task04_Hippocampus", "top_query"),
        ("MSD_Task04_Hippocampus", "top_query")]
    assert float(cases[0]["dice"]) > 0  # (HD95 is undefined, blank, where the prediction is empty)
    assert all(float(c["dice"]) == 0 and c["hd95"] == "" for c in cases[1:])
    markdown = (out / "table.md").read_text()
    assert "empty when its score is below 0.0 " in markdown and "(top query, score >= 0.99)" in markdown
    assert evaluate("--datalist", str(datalists["kvasir"]), "--checkpoint", "tiny", "--max-cases", "1",
                    "--volume-score-threshold", "0.5", "--out", str(tmp_path / "no_volume")) == 2
    assert "this run has no volume: leave it out" in capsys.readouterr().err
    assert evaluate("--datalist", str(datalists["kvasir"]), "--checkpoint", "tiny", "--volume-score-threshold", "2",
                    "--out", str(tmp_path / "bad")) == 2
    assert "--volume-score-threshold must be in [0, 1], got 2.0" in capsys.readouterr().err
    assert not (tmp_path / "no_volume").exists() and not (tmp_path / "bad").exists()
    # a --score-threshold nothing reads is refused: the pictures' top_query reads none and the volumes have their own
    # (the release's numbers typed without --protocol top_query_floor)
    assert evaluate("--datalist", str(datalists["kvasir"]), "--datalist", str(datalists["hippocampus"]),
                    "--checkpoint", "tiny", "--score-threshold", "0.1", "--volume-score-threshold", "0.5",
                    "--out", str(tmp_path / "unread")) == 2
    assert "--score-threshold 0.1 would change nothing here: protocol top_query reads no threshold" in \
        capsys.readouterr().err
    assert not (tmp_path / "unread").exists()


def test_the_volume_threshold_parameter_of_a_run_without_volumes(tmp_path):
    """What the evaluation bundle logs as ``volume_score_threshold`` (``volume_threshold_param``): the volumes'
    threshold, None (not logged) without volumes, where a value given is refused (``check_volume_score_threshold``,
    which the CLI calls too); the case inferer names the setting of a bad value."""
    from medsam3_monai.engines.evaluation import CaseInferer, evaluation_transforms, volume_threshold_param

    volume, picture = {"image": "ct.nii.gz"}, {"image": "a.png"}
    assert volume_threshold_param(0.1, 0.5, [picture, volume]) == 0.5
    assert volume_threshold_param(0.1, None, [volume]) == 0.1 and volume_threshold_param(0.1, None, [picture]) is None
    with pytest.raises(ValueError, match="^--volume_score_threshold is the volumes' detection threshold, and this "
                                         "run has no volume: leave it out$"):
        volume_threshold_param(0.1, 0.5, [picture])
    with pytest.raises(ValueError, match=r"^volume_score_threshold 2: give a number in \[0, 1\]$"):
        CaseInferer(evaluation_transforms(S), volume_score_threshold=2)


def test_saved_predictions_whose_names_collide_are_kept_apart(tmp_path):
    """``--save-predictions``: two datasets or cases whose names the file-name rules make alike get ``_2``, ... (one
    file never holds another case's prediction); 2D label values above 255 are written as 16-bit."""
    from types import SimpleNamespace

    import numpy as np
    from PIL import Image

    from medsam3_monai.engines.reports import PredictionWriter

    writer = PredictionWriter(tmp_path)
    cases = [("My Data/v1", "sub/dir case", 1), ("My Data v1", "sub dir/case", 2), ("My Data v1", "x", 300)]
    paths = [writer.write(SimpleNamespace(dataset=dataset, case=case, is_volume=False, items=[],
                                          pred=torch.full((4, 5), value, dtype=torch.int32)))
             for dataset, case, value in cases]
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == [
        "predictions/My_Data_v1/sub_dir_case_seg.png", "predictions/My_Data_v1/sub_dir_case_seg_2.png",
        "predictions/My_Data_v1/x_seg.png"]
    assert [int(np.asarray(Image.open(p)).max()) for p in paths] == [1, 2, 300]


def test_a_dataset_or_case_named_dots_stays_in_the_predictions_folder(tmp_path):
    """A hand-written datalist's ``"dataset": ".."`` named the report folder itself (``predictions/..``)."""
    from types import SimpleNamespace

    from medsam3_monai.engines.reports import PredictionWriter

    writer = PredictionWriter(tmp_path)
    paths = [writer.write(SimpleNamespace(dataset=dataset, case=case, is_volume=False, items=[],
                                          pred=torch.ones((4, 5), dtype=torch.int32)))
             for dataset, case in ((r"..", "a"), (".", ".."), ("../..", "b"))]
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == [
        "predictions/case/a_seg.png", "predictions/case/case_seg.png", "predictions/.._../b_seg.png"]
    assert all(p.resolve().is_relative_to((tmp_path / "predictions").resolve()) for p in paths)
