"""The dataset catalogue (datasets_meta): schema, cross-references, lookups, synonyms, prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medsam3_monai.data import catalogue as cat
from medsam3_monai.data.converters import CONVERTERS
from medsam3_monai.data.schemas import schema_errors

META = cat.meta_dir()


def _json(path):
    return json.loads(path.read_text(encoding="utf-8"))


def _documents():
    yield "synonyms", META / "synonyms.json"
    yield "papers", META / "papers.json"
    for path in sorted((META / "datasets").glob("*.json")):
        yield "dataset", path


@pytest.fixture(scope="module")
def catalogue() -> cat.Catalogue:
    return cat.load_catalogue()


def test_every_catalogue_file_matches_its_schema():
    failures = {}
    for schema_name, path in _documents():
        errors = schema_errors(_json(path), cat.load_schema(schema_name))
        if errors:
            failures[path.name] = errors
    assert not failures


def test_schema_checker_rejects_bad_entries():
    schema = cat.load_schema("dataset")
    good = _json(META / "datasets" / "BUSI.json")
    assert schema_errors(good, schema) == []
    bad = dict(good, modality="sonar", instance_rule="blobs", labels={"one": "Breast Tumor"}, extra=1)
    del bad["licence"]
    errors = "\n".join(schema_errors(bad, schema))
    for expected in ("'sonar'", "'blobs'", "'one'", "'Breast Tumor'", "'extra' was unexpected", "'licence'"):
        assert expected in errors, (expected, errors)


def test_schemas_are_valid_draft_2020_12():
    from jsonschema import Draft202012Validator

    for name in ("dataset", "synonyms", "papers", "datalist"):
        Draft202012Validator.check_schema(cat.load_schema(name))


def test_catalogue_holds_the_papers_dataset_lists(catalogue):
    medical = catalogue.papers["medical_sam3"]
    assert len(medical["training_datasets"]) == 33
    assert len(medical["internal_eval"]) == 10
    external = [row["dataset"] for row in medical["external_eval"]]
    assert set(external) == {"TN3K", "HC18", "CVC-ClinicDB", "ETIS-Larib", "PH2", "CHASE_DB1", "STARE"}
    for name in medical["training_datasets"]:
        entry = catalogue.get(name)
        assert "train" in entry.papers["medical_sam3"]["uses"] and entry.role == "internal"
        assert entry.raw["published"]["source"].startswith("Medical SAM3")
    for row in medical["internal_eval"]:
        assert "internal_eval" in catalogue.get(row["dataset"]).papers["medical_sam3"]["uses"]
    for name in external:
        entry = catalogue.get(name)
        assert entry.role == "external" and entry.papers["medical_sam3"]["uses"] == ["external_eval"]
    for name, prompt in medical["eval_prompts"].items():
        assert catalogue.eval_prompt(name, "medical_sam3") == prompt
    for name, phrase in catalogue.papers["medsam3"]["phrases"].items():
        assert catalogue.eval_prompt(name, "medsam3") == phrase
    assert len(catalogue.papers["medsam3"]["phrases"]) == 14


def test_unknown_table1_numbers_are_null_and_flagged(catalogue):
    for entry in catalogue.datasets.values():
        published = entry.raw["published"]
        if published and None in (published["images"], published["annotations"], published["median_area"]):
            assert "published" in entry.raw["unverified"], entry.name
        if not entry.labels:
            assert "labels" in entry.raw["unverified"], entry.name


def test_entries_are_consistent(catalogue):
    referenced = set()
    for entry in catalogue.datasets.values():
        assert set(entry.labels.values()) <= set(entry.concepts), entry.name
        assert set(entry.instance_rule_by_label) <= set(entry.labels), entry.name
        if entry.converter is not None:
            assert entry.converter in CONVERTERS, entry.name
            assert entry.labels and entry.mask_encoding and entry.raw["layout"], entry.name
            referenced.add(entry.converter)
    assert referenced == set(CONVERTERS), "every converter reads at least one catalogued dataset"


def test_known_lookups(catalogue):
    assert cat.concept_for("MSD_Task04_Hippocampus", 1) == "anterior hippocampus"
    assert cat.concept_for("MSD_Task04_Hippocampus_cropped", "2") == "posterior hippocampus"
    assert cat.concept_for("TotalSegmentator", 5) == "liver"
    assert cat.concept_for("TotalSegmentator", 2) == "right kidney"
    assert cat.concept_for("TotalSegmentator_MRI", 10) == "left lung"
    assert cat.concept_for("GBM40_HE_nuclei", 1) == "cell nucleus"
    assert catalogue.get("Kvasir‑SEG").name == "Kvasir-SEG"  # non-breaking hyphen as in the release log
    assert catalogue.get("isic_2018").name == "ISIC2018"
    assert catalogue.get("DSB18") is catalogue.get("DSB 2018")
    assert cat.eval_prompt("STARE") == "Retinal Blood Vessel"
    assert cat.eval_prompt("HC18") == "fetal head"
    assert cat.eval_prompt("MoNuSeg") == "cell nucleus"
    assert cat.eval_prompt("MoNuSeg", "medsam3") == "nuclei"
    assert cat.eval_prompt("GOALS") == "RNFL & GCIPL & choroid"
    assert cat.eval_prompt("MSD_Task04_Hippocampus") == "anterior hippocampus & posterior hippocampus"
    assert {"DRIVE", "CHASE_DB1", "STARE", "PAPILA"} <= set(cat.datasets_of_modality("fundus"))
    assert {"LiTS", "TotalSegmentator", "MSD_Task09_Spleen"} <= set(cat.datasets_of_modality("ct"))
    assert cat.get_dataset("TN3K").role == "external"
    entry = catalogue.get("MSD_Task03_Liver")
    assert entry.item_instance_rule() == {"1": "semantic", "2": "components"}
    assert catalogue.get("BUSI").item_instance_rule() == "components"


def test_unknown_names_are_clear_errors(catalogue):
    with pytest.raises(cat.CatalogueError, match="unknown dataset 'NoSuchSet'; known: .*BUSI"):
        catalogue.get("NoSuchSet")
    with pytest.raises(cat.CatalogueError, match="has no label value 7 .known: 1=anterior hippocampus"):
        cat.concept_for("MSD_Task04_Hippocampus", 7)
    with pytest.raises(cat.CatalogueError, match="unknown modality"):
        cat.datasets_of_modality("sonar")
    with pytest.raises(cat.CatalogueError, match="medsam3 gives no prompt for STARE"):
        cat.eval_prompt("STARE", "medsam3")


def test_synonyms(catalogue):
    assert cat.synonyms("nuclei")[0] == "cell nucleus"
    assert {"nucleus", "cell nucleus", "nuclei"} <= set(cat.synonyms("Nucleus"))
    assert {"tumor", "tumour", "mass", "lesion"} <= set(cat.synonyms("tumour"))
    assert cat.canonical_concept(" Breast Ultrasound Lesion ") == "breast tumor"
    assert cat.canonical_concept("Retinal Blood Vessel") == "retinal blood vessel"
    assert cat.canonical_concept("RNFL") == "retinal nerve fiber layer"
    assert cat.synonyms("spleen") == ["spleen"]


def test_synonym_groups_lead_with_catalogued_concepts(catalogue):
    concepts = {c for e in catalogue.datasets.values() for c in e.concepts}
    for group in catalogue.synonym_groups:
        for text in group[1:]:
            assert text.casefold() not in concepts, f"{text!r} is a dataset concept but not its group's canonical"


def test_published_numbers_carry_their_source(catalogue):
    """Every published number of the papers' tables names its document, table and page (or says they are unknown)
    and where it was actually taken from; `medsam3 reproduce` prints these lines under its table."""
    medical = catalogue.papers["medical_sam3"]
    table3 = medical["table3"]
    covered = {source["numbers"] for source in table3["sources"]}
    assert {"internal_eval", "averages", "external_eval"} <= covered
    for source in table3["sources"] + [catalogue.papers["medsam3"]["results"]["source"]]:
        assert {"document", "table", "page", "via", "checked_against_paper"} <= set(source)
        if source["page"] is None or source["table"] is None:  # not located in the paper: cannot have been checked
            assert source["checked_against_paper"] is False
    for row in medical["internal_eval"]:
        assert set(table3["methods"]) <= set(row)
    for group, keys in table3["averages_keys"].items():
        assert set(keys) == set(table3["methods"]) and set(keys.values()) <= set(medical["averages"]), group
    assert any("table3" in note for note in medical["unverified"])


def test_published_group_means_agree_with_the_published_datasets(catalogue):
    """The internal averages (54.0 / 77.0) are the means of the ten published per-dataset Dice, up to the rounding
    of those values to one decimal (53.96 and 77.05 before rounding)."""
    medical = catalogue.papers["medical_sam3"]
    for method, key in medical["table3"]["averages_keys"]["internal"].items():
        values = [row[method] for row in medical["internal_eval"]]
        assert abs(sum(values) / len(values) - medical["averages"][key]) <= 0.05 + 1e-9, method


def test_medsam3_results_name_catalogued_datasets_and_columns(catalogue):
    results = catalogue.papers["medsam3"]["results"]
    keys = [column["key"] for column in results["columns"]]
    assert len(keys) == len(set(keys))
    assert {column["protocol"] for column in results["columns"]} <= set(results["protocols"]) | {None}
    for name in results["datasets"]:
        assert catalogue.eval_prompt(name, "medsam3")  # a MedSAM3 dataset with its phrase
    assert set(results["dice"]) == set(results["datasets"])
    for name, values in results["dice"].items():
        assert set(values) <= set(keys), name
    unknown = [v for values in results["dice"].values() for v in values.values() if v is None]
    if unknown:
        assert any(note.startswith("results") for note in catalogue.papers["medsam3"]["unverified"])


def test_papers_schema_rejects_numbers_without_sources():
    schema = cat.load_schema("papers")
    good = _json(META / "papers.json")
    assert schema_errors(good, schema) == []
    bad = json.loads(json.dumps(good))
    bad["medical_sam3"]["internal_eval"][0]["sam3_dice"] = 165.7
    bad["medical_sam3"]["averages"]["internal_dice_sam3"] = "54"
    del bad["medical_sam3"]["table3"]["sources"][0]["page"]
    bad["medsam3"]["results"]["source"]["table"] = "tab. 2"
    bad["medsam3"]["results"]["columns"][0]["protocol"] = "box"
    errors = "\n".join(schema_errors(bad, schema))
    for expected in ("165.7", "'54'", "'page' is a required property", "'tab. 2'", "'box'"):
        assert expected in errors, (expected, errors)


def test_a_catalogue_copy_of_ones_own_is_checked_file_by_file(tmp_path, monkeypatch):
    """MEDSAM3_DATASETS_META: a folder that is not there, or lacks parts of datasets_meta, is named with what it
    lacks; an entry of one's own that breaks the schema, or whose labels' concepts are not in its 'concepts', is
    named by its file."""
    import shutil

    monkeypatch.setenv("MEDSAM3_DATASETS_META", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere: no such folder"):
        cat.meta_dir()
    partial = tmp_path / "partial"
    (partial / "datasets").mkdir(parents=True)
    monkeypatch.setenv("MEDSAM3_DATASETS_META", str(partial))
    with pytest.raises(FileNotFoundError, match="lacks schema/dataset.schema.json, .*papers.json, synonyms.json"):
        cat.meta_dir()

    copy = tmp_path / "meta"
    shutil.copytree(META, copy)
    monkeypatch.setenv("MEDSAM3_DATASETS_META", str(copy))
    mine = dict(_json(META / "datasets" / "Kvasir-SEG.json"), name="MyPolyps", aliases=["mypolyps"],
                modality="Endoscopy")
    path = copy / "datasets" / "MyPolyps.json"
    path.write_text(json.dumps(mine), encoding="utf-8")
    with pytest.raises(cat.CatalogueError, match=r"MyPolyps.json does not match .*dataset.schema.json") as info:
        cat.load_catalogue()
    assert "'Endoscopy' is not one of" in str(info.value)
    mine["modality"] = _json(META / "datasets" / "Kvasir-SEG.json")["modality"]
    mine["labels"] = {"1": "colon polyp"}
    mine["concepts"] = ["polyp"]
    path.write_text(json.dumps(mine), encoding="utf-8")
    with pytest.raises(cat.CatalogueError, match=r"MyPolyps.json: the label concepts \['colon polyp'\] are not in"):
        cat.load_catalogue()  # (a load that failed is not cached)
    mine["concepts"] = ["colon polyp"]
    path.write_text(json.dumps(mine), encoding="utf-8")
    assert "MyPolyps" in cat.load_catalogue().datasets
    # what would fail only later (a raw KeyError in medsam3 datalist, a datalist every reader refuses): at load
    for change, says in [({"converter": "Nope"}, r"MyPolyps.json: converter 'Nope' does not exist; give one of"),
                         ({"labels": {"0": "colon polyp"}}, r"MyPolyps.json does not match"),
                         ({"instance_rule_by_label": {"2": "semantic"}},
                          r"MyPolyps.json: instance_rule_by_label names label value\(s\) \['2'\]"),
                         ({"instance_rule": "instance_ids", "mask_encoding": "binary"},
                          r"MyPolyps.json: instance_rule 'instance_ids' .* give mask_encoding 'instance_map'")]:
        path.write_text(json.dumps({**mine, **change}), encoding="utf-8")
        cat._load.cache_clear()  # a successful load is cached
        with pytest.raises(cat.CatalogueError, match=says):
            cat.load_catalogue()
    path.write_text(json.dumps({**mine, "converter": "kvasir-seg"}), encoding="utf-8")  # the converter's spelling
    cat._load.cache_clear()
    assert cat.load_catalogue().get("MyPolyps").converter == "Kvasir-SEG"


def test_the_readmes_count_of_datasets_with_a_converter_is_the_catalogues():
    """Known limits says how many catalogued datasets a converter reads; a converter added must update it."""
    import re

    catalogue = cat.load_catalogue()
    with_one = sum(entry.converter is not None for entry in catalogue.datasets.values())
    readme = " ".join((Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8").split())
    said = re.search(r"converters are for (\d+) of the (\d+) catalogued datasets: (\d+) have none", readme)
    assert said is not None
    assert tuple(map(int, said.groups())) == (with_one, len(catalogue.datasets), len(catalogue.datasets) - with_one)
