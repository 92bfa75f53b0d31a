"""Prompt robustness (`medsam3 evaluate --prompt-variants synonyms`): the catalogue's phrasings of every concept of
the evaluation sets, the per-phrasing runs and the ensemble (the offline agent planner's fusion inside the
evaluation pipeline), and the robustness table, plot and MLflow runs on the shared data with the tiny network."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")

S = 112
#: the shared samples' catalogue datasets (TotalSegmentator's 117 organ classes are no evaluation set of either paper)
SHARED_EVALUATION_SETS = ("BUSI", "DRIVE", "GBM40_HE_nuclei", "ISBI2012_EM_membrane", "Kvasir-SEG",
                          "ChestXray_lung_sample", "MSD_Task04_Hippocampus")


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------------ catalogue
def evaluation_sets(catalogue) -> list[str]:
    """Medical SAM3's internal and external evaluation sets and evaluation prompts, MedSAM3's datasets, and the
    shared samples the docs evaluate."""
    medical, medsam3 = catalogue.papers["medical_sam3"], catalogue.papers["medsam3"]
    names = [row["dataset"] for row in medical["internal_eval"] + medical["external_eval"]]
    names += list(medical["eval_prompts"]) + list(medsam3["phrases"]) + list(SHARED_EVALUATION_SETS)
    return list(dict.fromkeys(catalogue.get(name).name for name in names))


def test_every_concept_of_the_evaluation_sets_has_at_least_three_phrasings():
    from medsam3_monai.data.catalogue import load_catalogue
    from medsam3_monai.metrics.robustness import concept_phrasings

    catalogue = load_catalogue()
    names = evaluation_sets(catalogue)
    assert len(names) >= 30 and {"BUSI", "LiTS", "TN3K", "PAPILA", "MoNuSeg"} <= set(names)
    short = {}
    for name in names:
        entry = catalogue.get(name)
        for concept in dict.fromkeys([*entry.labels.values(), *entry.concepts]):
            phrasings = [p.text for p in concept_phrasings(concept, name, catalogue=catalogue)]
            if len(phrasings) < 3:
                short[f"{name}: {concept}"] = phrasings
    assert not short, f"add phrasings to datasets_meta/synonyms.json: {short}"
    # the examples: the wordings whose scores swing
    assert "hepatic parenchyma" in catalogue.synonyms("liver")
    assert {"nuclei", "nucleus"} <= set(catalogue.synonyms("cell nucleus"))


def test_phrasings_come_from_the_datalist_prompt_the_papers_and_the_synonyms():
    from medsam3_monai.metrics.robustness import concept_phrasings

    nuclei = concept_phrasings("cell nucleus", "MoNuSeg")
    assert nuclei[0].text == "cell nucleus" and nuclei[0].source == "datalist prompt"
    assert ("nuclei", "MedSAM3 phrase table (MoNuSeg)") in [(p.text, p.source) for p in nuclei]
    assert [p.text for p in nuclei].count("nuclei") == 1  # duplicates (paper phrase = synonym) removed
    vessels = [p.text for p in concept_phrasings("retinal blood vessel", "STARE")]
    assert "Retinal Blood Vessel" not in vessels  # the paper's prompt, the same words as the concept
    lits = concept_phrasings("liver tumor", "LiTS")  # a two-concept phrase ('liver & liver tumor'): its own part
    assert [p.text for p in lits][:2] == ["liver tumor", "liver tumour"] and "liver" not in [p.text for p in lits]
    assert [p.text for p in concept_phrasings("Polyp", "Kvasir-SEG", max_phrasings=2)] == ["Polyp", "polyps"]
    assert [p.text for p in concept_phrasings("weird blob")] == ["weird blob"]  # not in the catalogue
    # the datalist prompt is always first, in any script and even without a letter (the run refuses that one)
    assert [p.text for p in concept_phrasings("乳腺肿瘤")] == ["乳腺肿瘤"]
    assert [p.text for p in concept_phrasings("???")] == ["???"]
    with pytest.raises(ValueError, match="max_phrasings"):
        concept_phrasings("polyp", max_phrasings=0)


def test_the_plan_gives_each_run_its_prompts():
    from medsam3_monai.metrics.robustness import ENSEMBLE, plan_phrasings

    items = [{"image": "a.nii.gz", "dataset": "MSD_Task04_Hippocampus", "group": "internal",
              "prompts": {"1": "anterior hippocampus", "2": "posterior hippocampus"}},
             {"image": "b.png", "dataset": "Kvasir-SEG", "group": "internal", "prompts": {"1": "polyp"}},
             {"image": "c.png", "dataset": "X", "prompts": ["weird blob"]}]
    plan = plan_phrasings(items)
    hippocampus = [p.text for p in plan.phrasings[("MSD_Task04_Hippocampus", 2)]]
    assert hippocampus[0] == "posterior hippocampus" and len(hippocampus) == 3
    assert plan.depth == 4 and plan.variants() == ["canonical", "phrasing-1", "phrasing-2", "phrasing-3", ENSEMBLE]
    canonical = plan.items_for(items, "canonical")
    assert [i["prompts"] for i in canonical] == [{"1": "anterior hippocampus", "2": "posterior hippocampus"},
                                                 {"1": "polyp"}, {"1": "weird blob"}]
    second = plan.items_for(items, "phrasing-2")
    assert [i["prompts"] for i in second] == [{"1": "hippocampal head", "2": "hippocampal body and tail"},
                                              {"1": "colorectal polyp"}]  # 'weird blob' has one phrasing: left out
    third = plan.items_for(items, "phrasing-3")
    assert [i["dataset"] for i in third] == ["Kvasir-SEG"]  # hippocampus has 3 phrasings per class
    ensemble = plan.items_for(items, ENSEMBLE)
    assert ensemble[0]["prompt_variants"]["1"] == [p.text for p in plan.phrasings[("MSD_Task04_Hippocampus", 1)]]
    assert ensemble[2]["prompt_variants"] == {"1": ["weird blob"]}
    assert all("prompt_variants" not in i for i in canonical) and items[0]["prompts"]["1"] == "anterior hippocampus"


def test_robustness_table_worst_case_spread_and_ensemble(tmp_path):
    from medsam3_monai.metrics.robustness import Phrasing, PhrasingPlan, robustness_plot, robustness_table

    plan = PhrasingPlan({("D", 1): [Phrasing("liver", "datalist prompt"), Phrasing("hepatic parenchyma", "s"),
                                    Phrasing("liver parenchyma", "s")],
                         ("D", 2): [Phrasing("cell", "datalist prompt"), Phrasing("cells", "s")]}, {"D": "internal"})

    def records(prompts_dice: dict[tuple[int, str], list[float]]) -> list[dict]:
        return [{"dataset": "D", "group": "internal", "case": f"c{i}", "label": label, "prompt": prompt,
                 "protocol": "semantic", "metrics": {"dice": d, "iou": d / 2}}
                for (label, prompt), dices in prompts_dice.items() for i, d in enumerate(dices)]

    runs = {"canonical": records({(1, "liver"): [0.8, 0.6], (2, "cell"): [0.5, 0.5]}),
            "phrasing-1": records({(1, "hepatic parenchyma"): [0.2, 0.4], (2, "cells"): [0.6, 0.6]}),
            "phrasing-2": records({(1, "liver parenchyma"): [0.5, 0.5], (2, "cell"): [0.9, 0.9]}),  # 2: stand-in
            "ensemble": records({(1, "liver"): [0.9, 0.7], (2, "cell"): [0.55, 0.55]})}
    table = robustness_table(runs, plan)

    liver, cell, overall = table.summary
    assert liver["worst_phrasing"] == "hepatic parenchyma" and liver["worst"] == pytest.approx(0.3)
    assert liver["canonical"] == pytest.approx(0.7) and liver["best"] == pytest.approx(0.7)
    assert liver["spread"] == pytest.approx(0.4) and liver["mean"] == pytest.approx(0.5)
    assert liver["ensemble"] == pytest.approx(0.8) and liver["ensemble_delta"] == pytest.approx(0.1)
    assert cell["phrasings"] == 2 and cell["worst"] == pytest.approx(0.5)  # the stand-in run is not counted
    assert cell["spread"] == pytest.approx(0.1)
    assert overall["dataset"] == "overall" and overall["spread"] == pytest.approx(0.25)
    assert table.protocol == "semantic"
    rows = {(r["label"], r["variant"]): r for r in table.rows}
    assert rows[(1, "phrasing-1")]["dice_delta"] == pytest.approx(-0.4) and rows[(1, "phrasing-1")]["n"] == 2
    assert (2, "phrasing-2") not in rows
    markdown = table.to_markdown("t", ["a note"])
    assert "| D | liver | hepatic parenchyma | 30.00 | 70.00 | 70.00 | 40.00 | 50.00 | 80.00 | +10.00 |" in markdown
    assert "- a note" in markdown and "**ensemble of 3**" in markdown
    assert table.metrics()["D/liver/dice_worst"] == pytest.approx(0.3)
    assert robustness_plot(table, tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    written = read_csv(table.to_csv(tmp_path / "r.csv"))
    assert len(written) == 7 and written[0]["phrasing"] == "liver" and written[0]["protocol"] == "semantic"
    # a run of pictures and volumes: each dataset under its own protocol, the table under both
    for run in runs.values():
        run += [dict(r, dataset="V", protocol="top_query") for r in run if r["dataset"] == "D"]
    plan.phrasings.update({("V", key[1]): value for key, value in plan.phrasings.items()})
    mixed = robustness_table(runs, plan)
    assert mixed.protocol == "semantic, top_query"
    assert {(s["dataset"], s["protocol"]) for s in mixed.summary} == {
        ("D", "semantic"), ("V", "top_query"), ("overall", "semantic, top_query")}


def test_a_concept_with_one_phrasing_has_no_spread_and_stays_out_of_the_overall_row():
    """A concept the catalogue has no other wording for is not 'spread 0': its worst / spread / mean are unknown
    and the overall means leave it out; a plan where nothing can vary, or one dataset label with two prompts, is
    refused."""
    from medsam3_monai.metrics.robustness import Phrasing, PhrasingPlan, plan_phrasings, robustness_table

    plan = PhrasingPlan({("D", 1): [Phrasing("liver", "datalist prompt"), Phrasing("hepatic parenchyma", "s")],
                         ("W", 1): [Phrasing("gastric widget", "datalist prompt")]}, {"D": "internal", "W": "other"})
    record = lambda dataset, prompt, dice: {"dataset": dataset, "case": "c", "label": 1, "prompt": prompt,  # noqa
                                             "protocol": "semantic", "metrics": {"dice": dice, "iou": dice}}
    table = robustness_table({"canonical": [record("D", "liver", 0.6), record("W", "gastric widget", 0.4)],
                              "phrasing-1": [record("D", "hepatic parenchyma", 0.5)]}, plan)
    liver, widget, overall = table.summary
    assert widget["varied"] is False and widget["canonical"] == pytest.approx(0.4)
    assert all(math.isnan(widget[k]) for k in ("worst", "spread", "mean"))
    assert overall["spread"] == pytest.approx(liver["spread"]) == pytest.approx(0.1)
    assert overall["canonical"] == pytest.approx(0.6) and "1 with one phrasing left out" in overall["concept"]
    assert "| W | gastric widget | – | – | 40.00 | – | – | – |" in table.to_markdown()
    with pytest.raises(ValueError, match="no concept here has a second phrasing in the catalogue"):
        plan_phrasings([{"dataset": "W", "prompts": {"1": "gastric widget"}}])
    with pytest.raises(ValueError, match="dataset 'Mixed', label value 1: items prompt 'polyp' and 'lung'"):
        plan_phrasings([{"dataset": "Mixed", "prompts": {"1": "polyp"}},
                        {"dataset": "Mixed", "prompts": {"1": "lung"}}])


# ------------------------------------------------------------------------------------------------ shared data
@pytest.fixture(scope="module")
def datalists(shared_data, tmp_path_factory) -> dict[str, Path]:
    from medsam3_monai.data import build_datalist, write_datalist

    folder = tmp_path_factory.mktemp("datalists")
    return {key: write_datalist(build_datalist(name, shared_data / name).datalist, folder / f"{key}.json")
            for key, name in (("kvasir", "Kvasir-SEG_sample"), ("chest", "ChestXray_lung_sample"))}


def test_the_ensemble_is_the_offline_planners_fusion_in_one_network_call(datalists, tiny_net):
    """The evaluation's ensemble = `medsam3 agent --llm none`'s fusion of the same phrasings, from one vision pass."""
    from medsam3_monai.agent.fusion import fuse_by_confidence
    from medsam3_monai.data.selection import evaluation_items
    from medsam3_monai.engines.evaluation import EnsembleCaseInferer, evaluation_transforms
    from medsam3_monai.inferers.predict import Predictor
    from medsam3_monai.metrics.robustness import ENSEMBLE, plan_phrasings

    items = evaluation_items([datalists["kvasir"]], "all", max_cases=1)
    plan = plan_phrasings(items)
    (item,) = plan.items_for(items, ENSEMBLE)
    phrasings = item["prompt_variants"]["1"]
    assert len(phrasings) >= 3
    transform = evaluation_transforms(tiny_net.image_size)
    inferer = EnsembleCaseInferer(transform, protocol="semantic")
    calls = []
    handle = tiny_net.sam3.vision_encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad():
            prediction = inferer(transform(dict(item)), tiny_net)
    finally:
        handle.remove()
    assert len(calls) == 1  # every phrasing in one network call
    assert prediction.prompts == ["polyp"] and prediction.values == [1]
    predictor = Predictor(tiny_net, tracker="none", protocol="semantic")
    reference = predictor(item["image"], phrasings)
    fused = fuse_by_confidence(reference, 0.5)
    assert float(prediction.scores[0]) == pytest.approx(fused.score)
    # the mask: the union of the kept phrasings' own masks (the others take no pixel from them), what
    # `medsam3 segment` with the kept phrasings alone covers
    alone = predictor(item["image"], fused.kept)
    union = alone.label_map.as_tensor().numpy() != 0
    assert union.any() and np.array_equal(prediction.masks[0].numpy(), union)


@pytest.mark.slow
def test_evaluate_prompt_variants_writes_the_robustness_table(datalists, tmp_path, capsys):
    from mlflow import MlflowClient

    from medsam3_monai.deploy.cli import main

    out = tmp_path / "robustness"
    rc = main(["evaluate", "--datalist", str(datalists["kvasir"]), "--datalist", str(datalists["chest"]),
               "--checkpoint", "tiny", "--image-size", str(S), "--out", str(out), "--split", "all",
               "--max-cases", "1", "--protocol", "semantic", "--prompt-variants", "synonyms", "--overlays", "1",
               "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert "== prompt robustness" in capsys.readouterr().out

    plan = json.loads((out / "phrasings.json").read_text())
    phrasings = {entry["dataset"]: [p["text"] for p in entry["phrasings"]] for entry in plan}
    assert phrasings["Kvasir-SEG"][0] == "polyp" and phrasings["ChestXray_lung_sample"][0] == "lung"
    depth = max(len(p) for p in phrasings.values())
    runs = ["canonical", *[f"phrasing-{k}" for k in range(1, depth)], "ensemble"]
    for run in runs:
        cases = read_csv(out / run / "cases.csv")
        k = int(run.split("-")[1]) if run.startswith("phrasing-") else 0
        expected = {d: p[k] if k < len(p) else p[0] for d, p in phrasings.items()}
        assert {c["dataset"]: c["prompt"] for c in cases} == expected, run  # the ensemble keeps the canonical name
    assert (out / "canonical" / "overlays").is_dir() and not (out / "phrasing-1" / "overlays").exists()

    rows = read_csv(out / "robustness.csv")
    for dataset, texts in phrasings.items():
        mine = [r for r in rows if r["dataset"] == dataset]
        assert [r["phrasing"] for r in mine[:-1]] == texts and mine[-1]["variant"] == "ensemble"
        canonical = {r["name"]: r for r in read_csv(out / "canonical" / "table.csv")}[dataset]
        assert float(mine[0]["dice"]) == pytest.approx(float(canonical["dice"]))
        ensemble = {r["name"]: r for r in read_csv(out / "ensemble" / "table.csv")}[dataset]
        assert float(mine[-1]["dice"]) == pytest.approx(float(ensemble["dice"]))
    summary = {r["dataset"]: r for r in read_csv(out / "robustness_summary.csv")}
    for dataset in phrasings:
        dices = [float(r["dice"]) for r in rows if r["dataset"] == dataset and r["variant"] != "ensemble"]
        assert float(summary[dataset]["worst"]) == pytest.approx(min(dices))
        assert float(summary[dataset]["spread"]) == pytest.approx(max(dices) - min(dices))
        assert not math.isnan(float(summary[dataset]["ensemble"]))
    markdown = (out / "robustness.md").read_text()
    assert "| Dataset | Concept | Worst phrasing | Worst Dice (%)" in markdown and "protocol semantic" in markdown
    assert (out / "robustness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlruns.db'}")
    found = client.search_runs([client.get_experiment_by_name("medsam3-evaluate").experiment_id])
    parent = next(r for r in found if r.info.run_name == "tiny: prompt robustness")
    children = {r.info.run_name for r in found if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert children == set(runs) and parent.info.status == "FINISHED"
    assert {"robustness.csv", "robustness.md", "robustness.png", "phrasings.json"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)}
    assert parent.data.metrics["Kvasir-SEG/polyp/dice_worst"] == pytest.approx(float(summary["Kvasir-SEG"]["worst"]))
    assert parent.data.params["prompt_variants"] == "synonyms"


def test_prompt_variant_option_errors(datalists, tmp_path, capsys):
    from medsam3_monai.deploy.cli import main

    out = tmp_path / "never"
    base = ["evaluate", "--datalist", str(datalists["kvasir"]), "--out", str(out), "--prompt-variants", "synonyms"]
    for extra, message in ((["--checkpoint", "tiny", "--checkpoint", "tiny"], "evaluates one checkpoint"),
                           (["--checkpoint", "tiny", "--agent"], "two studies"),
                           (["--checkpoint", "tiny", "--max-phrasings", "0"], "--max-phrasings must be at least 1")):
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and "note:" not in err  # no comparison note before the refusal
        assert not out.exists()
    # a study's options without the study would change nothing: refused, not ignored
    plain = ["evaluate", "--datalist", str(datalists["kvasir"]), "--out", str(out), "--checkpoint", "tiny"]
    for extra, message in ((["--max-phrasings", "2"], "--max-phrasings would change nothing here"),
                           (["--keep-ratio", "1"], "--keep-ratio would change nothing here"),
                           (["--prompt-variants", "synonyms", "--agent-request", "x"],
                            "--agent-request would change nothing here: --agent-request is the agent's")):
        assert main([*plain, *extra]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()


def test_a_study_where_every_prediction_is_empty_says_so_in_its_table(datalists, tmp_path, capsys):
    """Nothing above a score threshold of 1: every run's masks are empty, and robustness.md warns first thing
    instead of showing a table of zeros as if it measured something."""
    from medsam3_monai.deploy.cli import main

    out = tmp_path / "empty"
    assert main(["evaluate", "--datalist", str(datalists["kvasir"]), "--checkpoint", "tiny", "--out", str(out),
                 "--max-cases", "1", "--protocol", "threshold", "--score-threshold", "1", "--prompt-variants",
                 "synonyms", "--max-phrasings", "2", "--overlays", "0", "--no-mlflow", "--no-progress"]) == 0
    text = (out / "robustness.md").read_text()
    assert "- WARNING: every prediction of every run is empty" in text
