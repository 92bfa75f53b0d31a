"""Every real sample folder in ../shared/data converts to a valid datalist with the expected counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medsam3_monai.data.catalogue import load_schema
from medsam3_monai.data.cli import datalist_command
from medsam3_monai.data.datalist import build_datalist, load_datalist, write_datalist
from medsam3_monai.data.schemas import schema_errors

# folder -> (training + validation, test)
EXPECTED = {
    "BUSI": (149, 0),
    "DRIVE": (20, 20),
    "GBM40_HE_nuclei": (40, 0),
    "ISBI2012_EM_membrane": (30, 0),
    "Kvasir-SEG_sample": (5, 0),
    "ChestXray_lung_sample": (4, 0),
    "MSD_Task04_Hippocampus_cropped": (260, 0),
    "TotalSegmentator_example_CT_MR": (2, 0),
}


@pytest.fixture(scope="module")
def built(shared_data: Path):
    """Datalist of a shared folder, built once per module (the hippocampus value check reads 260 volumes)."""
    cache: dict[str, object] = {}

    def get(folder: str):
        if folder not in cache:
            cache[folder] = build_datalist(folder, shared_data / folder)
        return cache[folder]

    return get


def _items(datalist):
    return [item for split in ("training", "validation", "test") for item in datalist[split]]


@pytest.mark.parametrize("folder", sorted(EXPECTED))
def test_shared_folder_converts(built, folder: str):
    result = built(folder)
    datalist = result.datalist
    assert schema_errors(datalist, load_schema("datalist")) == []
    pool, test = EXPECTED[folder]
    assert len(datalist["training"]) + len(datalist["validation"]) == pool
    assert len(datalist["test"]) == test
    assert not result.skipped and not result.unlabelled
    for item in _items(datalist):
        labels = item["label"] if isinstance(item["label"], list) else [item["label"]]
        assert Path(item["image"]).is_absolute() and Path(item["image"]).is_file()
        assert all(Path(label).is_file() for label in labels)
    if pool >= 4:
        assert datalist["validation"], "a 15% validation split exists"


def test_busi_keeps_normals_and_merges_the_second_mask(built):
    datalist = built("BUSI").datalist
    items = {item["case"]: item for item in _items(datalist)}
    assert sum(case.startswith("normal") for case in items) == 50
    for split in ("training", "validation"):
        assert {item["case"].split(" ")[0] for item in datalist[split]} == {"benign", "malignant", "normal"}
    merged = items["benign (25)"]["label"]
    assert [Path(p).name for p in merged] == ["benign (25)_mask.png", "benign (25)_mask_1.png"]
    assert items["normal (1)"]["prompts"] == {"1": "breast tumor"}
    assert items["normal (1)"]["mask_encoding"] == "binary"


def test_drive_keeps_the_official_test_half(built):
    datalist = built("DRIVE").datalist
    assert all(item["case"].endswith("_test") for item in datalist["test"])
    assert all(item["case"].endswith("_training") for item in datalist["training"] + datalist["validation"])
    assert all(item["label"].endswith("_manual1.gif") for item in _items(datalist))
    assert [item["case"] for item in datalist["validation"]] == ["25_training", "37_training", "38_training"]


def test_item_fields_for_instances_and_label_maps(built, shared_data: Path):
    gbm = _items(built("GBM40_HE_nuclei").datalist)[0]
    assert gbm["label"].endswith("_instances.png")
    assert (gbm["instance_rule"], gbm["mask_encoding"]) == ("instance_ids", "instance_map")
    assert gbm["prompts"] == {"1": "cell nucleus"}
    hippo = _items(built("MSD_Task04_Hippocampus_cropped").datalist)
    assert hippo[0]["prompts"] == {"1": "anterior hippocampus", "2": "posterior hippocampus"}
    assert (hippo[0]["dataset"], hippo[0]["modality"]) == ("MSD_Task04_Hippocampus", "MRI")
    assert hippo[0]["mask_encoding"] == "label_map"
    total = {item["dataset"]: item for item in _items(built("TotalSegmentator_example_CT_MR").datalist)}
    assert total["TotalSegmentator"]["modality"] == "CT" and total["TotalSegmentator"]["prompts"]["5"] == "liver"
    mri = total["TotalSegmentator_MRI"]
    assert mri["modality"] == "MRI" and mri["prompts"]["11"] == "right lung"
    for name in ("TotalSegmentator_MRI", "TotalSegmentator"):  # naming one dataset: its items alone
        named = _items(build_datalist(name, shared_data / "TotalSegmentator_example_CT_MR").datalist)
        assert [item["dataset"] for item in named] == [name] and named[0]["image"] == total[name]["image"]


def test_same_output_twice_and_relative_paths(built, shared_data: Path):
    first = built("Kvasir-SEG_sample").datalist
    assert build_datalist("Kvasir-SEG", shared_data / "Kvasir-SEG_sample").datalist == first
    assert build_datalist("BUSI", shared_data / "BUSI").datalist == built("BUSI").datalist
    relative = build_datalist("Kvasir-SEG", shared_data / "Kvasir-SEG_sample", relative_to=shared_data).datalist
    item = relative["training"][0]
    assert item["image"].startswith("Kvasir-SEG_sample/images/") and (shared_data / item["label"]).is_file()


def test_cli_writes_the_datalist(shared_data: Path, tmp_path: Path, capsys):
    out = tmp_path / "lists" / "chest.json"
    argv = ["ChestXray_lung_sample", str(shared_data / "ChestXray_lung_sample"), "--out", str(out)]
    assert datalist_command(argv) == 0
    written = json.loads(out.read_text())
    assert set(written) == {"training", "validation", "test"}
    assert "4 items (training 3, validation 1, test 0)" in capsys.readouterr().err
    assert datalist_command(argv) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    # an --out that cannot be written is refused before the build (helper-87: after minutes of --check decoding)
    import medsam3_monai.data.datalist as data_datalist

    built_before = []
    real_build = data_datalist.build_datalist
    data_datalist.build_datalist = lambda *a, **k: built_before.append(1) or real_build(*a, **k)
    try:
        assert datalist_command([*argv[:2], "--check", "--out", str(out)]) == 2  # exists, no --overwrite
        assert datalist_command([*argv[:2], "--out", str(tmp_path / "lists"), "--overwrite"]) == 2  # a folder
        assert "is a folder: give the datalist's file name" in capsys.readouterr().err
        assert datalist_command([*argv[:2], "--out", str(out / "sub.json")]) == 2  # under a file
        assert "is a file" in capsys.readouterr().err
    finally:
        data_datalist.build_datalist = real_build
    assert built_before == []
    # a datalist saved with a byte-order mark (Notepad) reads as any other
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + out.read_bytes())
    assert load_datalist(bom, "training") == load_datalist(out, "training")


def test_load_datalist_joins_only_image_and_label(built, shared_data: Path, tmp_path: Path):
    relative = build_datalist("BUSI", shared_data / "BUSI", relative_to=shared_data).datalist
    path = write_datalist(relative, tmp_path / "busi.json")
    items = {item["case"]: item for item in load_datalist(path, "training", base_dir=shared_data)}
    absolute = {item["case"]: item for item in built("BUSI").datalist["training"]}
    assert items == absolute  # 'dataset': 'BUSI' stays a name although shared_data/BUSI exists
    with pytest.raises(ValueError, match="no 'train' list"):
        load_datalist(path, "train")


@pytest.mark.parametrize("content, words", [
    ("[1, 2]", "an object of lists"),
    ('{"training": "a.png"}', "'training' must be a list"),
    ('{"training": ["a.png"]}', "training item 1 is 'a.png', not an object"),
    ('{"training": [{"label": "m.png"}]}', "training item 1 has no 'image' path"),
    ('{"training": [{"image": "a.png", "label": null}]}', "training item 1 has no 'label' path"),
    ('{"training": [{"image": "a.png", "label": ["m.png", 3]}]}', "'label' must be a file path"),
    ('{"training": [{"image": "a.png", "label": "m.png", "prompts": {"1": "polyp"}}, '
     '{"image": "b.png", "label": "n.png", "prompts": ["polyp"]}]}',
     "training item 2: 'prompts' is a list, not an object of label value -> text"),
    ('{"training": [{"image": "a.png", "label": "m.png"}]}',
     r"training item 1 \(.*a.png\) has no 'prompts': give its label value -> text object, e.g. \{\"1\": \"polyp\"\}"),
    ('{"training": [{"image": "a.png", "label": "m.png", "prompts": {"lung": "1"}}]}',
     r"training item 1: 'prompts' keys \['lung'\] are not label values"),
    ('{"training": [{"image": "a.png", "label": "m.png", "prompts": {"1": "  ", "2": "b", "3": 4}}]}',
     r"training item 1: 'prompts' \{'1': '  ', '3': 4\} give no concept text"),
    ('{"training": [{"image": "a.png", "label": "m.png", "prompts": {"1": "' + "very " * 40 + 'long"}}]}',
     r"training item 1: prompt 1 'very very .*' is 43 tokens; SAM3 reads at most 32 \(start and end included\)"),
    ('{"training": [{"image": "a.nii.gz", "label": "m.nii.gz", "prompts": {"1": "liver"}, "modalty": "MRI"}]}',
     r"training item 1: key 'modalty' is not one the readers take; did you mean 'modality'\?"),
    ('{"training": [', "not valid JSON"),
])
def test_load_datalist_names_a_malformed_item(content: str, words: str, tmp_path: Path):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=words) as error:
        load_datalist(path, "training")
    assert str(path) in str(error.value)


def test_a_key_of_the_users_own_is_kept_and_only_a_misspelling_is_refused(tmp_path: Path):
    path = tmp_path / "own.json"
    path.write_text('{"training": [{"image": "a.png", "label": "m.png", "prompts": {"1": "polyp"}, '
                    '"patient_id": "P7", "caseid": "c1", "label2": "m2.png", "Dataset": "mine", "dataset": "D"}]}')
    (item,) = load_datalist(path, "training")
    assert (item["patient_id"], item["caseid"], item["label2"], item["Dataset"]) == ("P7", "c1", "m2.png", "mine")


def test_the_full_totalsegmentator_release_is_named_as_not_read(tmp_path: Path):
    """The release's sNNNN/ct.nii.gz + segmentations/ layout is not the example pair this converter reads: the
    error says so and what to do, instead of only the expected layout."""
    for subject in ("s0001", "s0002"):
        (tmp_path / subject / "segmentations").mkdir(parents=True)
        (tmp_path / subject / "ct.nii.gz").write_bytes(b"")
    with pytest.raises(ValueError, match=r"no TotalSegmentator example pair found. Expected .*; .* looks like the "
                                         r"full release \(2 subject folder\(s\) such as s0001/ .*merge each subject's "
                                         r"masks into one label map and write the datalist yourself"):
        build_datalist("TotalSegmentator", tmp_path)


def test_a_folder_of_another_dataset_is_said_to_look_like_one(shared_data: Path, tmp_path: Path):
    """images/ + masks/ named as another dataset names them: the error says the folders are there, and how to find
    the dataset whose layout they follow."""
    root = shared_data / "Kvasir-SEG_sample"
    with pytest.raises(ValueError, match=r"no usable image/mask pairs found.*has images/ and masks/, but no image "
                                         r"there has its mask named as BUSI's are: is it another dataset\? "
                                         r"\(`medsam3 datalist --list`"):
        build_datalist("BUSI", root)



@pytest.mark.parametrize("folder, name, says", [
    ("BUSI", "CVC-ClinicDB", "no mask found"),  # images and masks, named otherwise
    ("MSD_Task04_Hippocampus_cropped", "MSD_Task09_Spleen", "label value(s) [2] are not in the catalogue entry"),
])
def test_a_folder_none_of_whose_pairs_is_usable_asks_whether_it_is_another_dataset(shared_data: Path, folder, name,
                                                                                    says):
    """Problems with every pair (none usable) end with the question the no-pairs error asks."""
    root = shared_data / folder
    with pytest.raises(ValueError) as error:
        build_datalist(name, root)
    message = str(error.value)
    assert says in message and message.endswith(
        f"No image/mask pair of {root} is usable as {name.split('_Task')[0]}'s: is it another dataset? "
        "(`medsam3 datalist --list` names the catalogue's datasets and their layouts)")


def test_a_folder_with_usable_pairs_lists_its_problems_without_the_question(shared_data: Path, tmp_path: Path):
    source = shared_data / "Kvasir-SEG_sample"
    for sub in ("images", "masks"):
        (tmp_path / sub).mkdir()
        for path in sorted((source / sub).glob("*.jpg"))[:2]:
            (tmp_path / sub / path.name).symlink_to(path)
    (tmp_path / "images" / "lonely.jpg").symlink_to(sorted((source / "images").glob("*.jpg"))[2])
    with pytest.raises(ValueError, match="1 problem") as error:
        build_datalist("Kvasir-SEG", tmp_path)
    assert "lonely.jpg" in str(error.value) and "another dataset" not in str(error.value)
