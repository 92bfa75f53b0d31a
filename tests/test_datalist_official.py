"""Converters on small synthetic folders in each dataset's official layout, and bad-input errors."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medsam3_monai.data.catalogue import load_schema
from medsam3_monai.data.cli import datalist_command
from medsam3_monai.data.datalist import build_datalist
from medsam3_monai.data.pairs import DatalistError
from medsam3_monai.data.schemas import schema_errors


def img(path: Path, size: tuple[int, int] = (8, 6), mode: str = "L", fmt: str | None = None) -> Path:
    """A tiny image file (``size`` is PIL's (width, height))."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, 0).save(path, format=fmt)
    return path


def vol(path: Path, values: tuple[int, ...] = (0, 1, 2), shape: tuple[int, int, int] = (4, 5, 3)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.zeros(shape, dtype=np.uint8)
    data.flat[: len(values)] = values
    nib.Nifti1Image(data, np.eye(4)).to_filename(str(path))
    return path


def build(name: str, root: Path, **kwargs):
    result = build_datalist(name, root, **kwargs)
    assert schema_errors(result.datalist, load_schema("datalist")) == []
    return result


def cases(datalist, split: str) -> list[str]:
    return [item["case"] for item in datalist[split]]


# ------------------------------------------------------------------ internal datasets (85/15 + official test)


def test_busi_official_class_folders(tmp_path: Path):
    base = tmp_path / "Dataset_BUSI_with_GT"
    for cls in ("benign", "malignant", "normal"):
        for n in (1, 2, 3):
            img(base / cls / f"{cls} ({n}).png", mode="RGB")
            img(base / cls / f"{cls} ({n})_mask.png", mode="1")
    img(base / "benign" / "benign (1)_mask_1.png")
    datalist = build("BUSI", tmp_path).datalist
    items = {i["case"]: i for split in ("training", "validation") for i in datalist[split]}
    assert len(items) == 9 and not datalist["test"]
    assert [Path(p).name for p in items["benign (1)"]["label"]] == ["benign (1)_mask.png", "benign (1)_mask_1.png"]
    assert len(datalist["validation"]) == 3  # one per class (stratified)


def test_drive_official_training_and_test(tmp_path: Path):
    for n in (21, 22, 23, 24):
        img(tmp_path / "DRIVE/training/images" / f"{n}_training.tif", mode="RGB")
        img(tmp_path / "DRIVE/training/1st_manual" / f"{n}_manual1.gif", fmt="GIF")
        img(tmp_path / "DRIVE/training/mask" / f"{n}_training_mask.gif", fmt="GIF")
    for n in ("01", "02"):
        img(tmp_path / "DRIVE/test/images" / f"{n}_test.tif", mode="RGB")
        img(tmp_path / "DRIVE/test/1st_manual" / f"{n}_manual1.gif", fmt="GIF")
        img(tmp_path / "DRIVE/test/2nd_manual" / f"{n}_manual2.gif", fmt="GIF")
    datalist = build("DRIVE", tmp_path).datalist
    assert cases(datalist, "test") == ["01_test", "02_test"]
    assert len(datalist["training"]) + len(datalist["validation"]) == 4 and len(datalist["validation"]) == 1


def test_drive_release_without_test_labels_counts_them_unlabelled(tmp_path: Path):
    img(tmp_path / "training/images/21_training.tif", mode="RGB")
    img(tmp_path / "training/1st_manual/21_manual1.gif", fmt="GIF")
    img(tmp_path / "test/images/01_test.tif", mode="RGB")
    result = build("DRIVE", tmp_path)
    assert result.counts() == {"training": 1, "validation": 0, "test": 0}
    assert [p.path.name for p in result.unlabelled] == ["01_test.tif"]
    assert "1 unlabelled" in result.summary()


def test_kvasir_official(tmp_path: Path):
    for name in ("cju0a", "cju0b", "cju0c"):
        img(tmp_path / "Kvasir-SEG/images" / f"{name}.jpg", mode="RGB")
        img(tmp_path / "Kvasir-SEG/masks" / f"{name}.jpg", mode="RGB")
    (tmp_path / "Kvasir-SEG/kavsir_bboxes.json").write_text("{}")
    result = build("Kvasir-SEG", tmp_path)
    assert result.counts() == {"training": 2, "validation": 1, "test": 0}


def test_isic2018_pools_training_and_validation_and_keeps_test(tmp_path: Path):
    parts = {
        "Training": ["0000000", "0000001", "0000002", "0000003"],
        "Validation": ["0000010", "0000011"],
        "Test": ["0000020", "0000021"],
    }
    for part, ids in parts.items():
        for i in ids:
            img(tmp_path / f"ISIC2018_Task1-2_{part}_Input" / f"ISIC_{i}.jpg", mode="RGB")
            img(tmp_path / f"ISIC2018_Task1_{part}_GroundTruth" / f"ISIC_{i}_segmentation.png")
        (tmp_path / f"ISIC2018_Task1-2_{part}_Input" / "LICENSE.txt").write_text("terms")
    datalist = build("ISIC 2018", tmp_path).datalist
    assert cases(datalist, "test") == ["ISIC_0000020", "ISIC_0000021"]
    assert len(datalist["training"]) + len(datalist["validation"]) == 6
    assert datalist["test"][0]["prompts"] == {"1": "skin lesion"}


def test_msd_dataset_json_layout(tmp_path: Path):
    task = tmp_path / "Task04_Hippocampus"
    training = []
    for n in range(1, 8):
        vol(task / "imagesTr" / f"hippocampus_{n:03d}.nii.gz")
        vol(task / "labelsTr" / f"hippocampus_{n:03d}.nii.gz")
        name = f"hippocampus_{n:03d}.nii.gz"
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    vol(task / "imagesTs" / "hippocampus_100.nii.gz")
    meta = {"name": "Hippocampus", "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
            "training": training, "test": ["./imagesTs/hippocampus_100.nii.gz"]}
    (task / "dataset.json").write_text(json.dumps(meta))
    result = build("MSD", task)
    assert result.counts() == {"training": 6, "validation": 1, "test": 0}
    assert result.datalist["training"][0]["dataset"] == "MSD_Task04_Hippocampus"
    assert len(result.unlabelled) == 1
    assert build("MSD", tmp_path).datalist == result.datalist  # the folder the task was unpacked into
    (task / "dataset.json").rename(tmp_path / "kept.json")  # a named task without its dataset.json: paired by name
    assert build("MSD_Task04_Hippocampus", task).counts() == {"training": 6, "validation": 1, "test": 0}
    with pytest.raises(DatalistError, match="no dataset.json"):
        build_datalist("MSD", task)
    (tmp_path / "kept.json").rename(task / "dataset.json")
    # another task's name (the same label ids): its prompts and modality would be taken: refused, the task named
    with pytest.raises(DatalistError, match=r"labels \{'1': 'anterior', '2': 'posterior'\} \(dataset.json name "
                                            r"'Hippocampus'\) are not MSD_Task07_Pancreas's .* it is "
                                            "MSD_Task04_Hippocampus: name that one"):
        build_datalist("MSD_Task07_Pancreas", task)
    meta["labels"] = {"0": "background", "1": "hippocampus"}
    (task / "dataset.json").write_text(json.dumps(meta))
    expected = (r"dataset.json: this task's labels \{'1': 'hippocampus'\} .* are not MSD_Task04_Hippocampus's .* "
                "name the dataset it is, or, if it is MSD_Task04_Hippocampus, update")
    with pytest.raises(DatalistError, match=expected):
        build_datalist("MSD", task)


def test_msd_multichannel_task_names_its_channel_and_evaluates(shared_data: Path, tmp_path: Path, capsys):
    """MSD Prostate / BrainTumour images are 4D (one channel per MR sequence, dataset.json 'modality'): the datalist
    must say which channel is segmented (--channel N, written into each item), and then medsam3 evaluate runs it
    (it has no --channel of its own: the items say)."""
    from medsam3_monai.deploy.cli import main

    source = shared_data / "MSD_Task04_Hippocampus_cropped"
    task = tmp_path / "Task05_Prostate"
    training = []
    for image in sorted((source / "images").glob("*.nii.gz"))[:3]:
        volume = nib.load(image)
        sequences = np.stack([volume.get_fdata(), volume.get_fdata()[::-1]], axis=-1)  # (X, Y, Z, 2): T2, ADC
        (task / "imagesTr").mkdir(parents=True, exist_ok=True)
        nib.Nifti1Image(sequences.astype(np.float32), volume.affine).to_filename(task / "imagesTr" / image.name)
        (task / "labelsTr").mkdir(exist_ok=True)
        (task / "labelsTr" / image.name).write_bytes((source / "masks" / image.name).read_bytes())
        training.append({"image": f"./imagesTr/{image.name}", "label": f"./labelsTr/{image.name}"})
    meta = {"name": "Prostate", "modality": {"0": "T2", "1": "ADC"},
            "labels": {"0": "background", "1": "PZ", "2": "TZ"}, "training": training, "test": []}
    # without dataset.json (a named task): the channels are counted from the images' headers
    with pytest.raises(DatalistError, match=r"2 channels \(0, 1\): choose the one to segment with --channel N"):
        build_datalist("MSD_Task05_Prostate", task)
    assert {item["channel"] for item in build("MSD_Task05_Prostate", task, channel=0).datalist["training"]} == {0}
    (task / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatalistError, match=r"2 channels \(0 T2, 1 ADC\): choose the one to segment with --channel N"):
        build_datalist("MSD", task)
    with pytest.raises(DatalistError, match=r"channel 2 is not one of the images' channels \(0 T2, 1 ADC\)"):
        build_datalist("MSD", task, channel=2)
    datalist = tmp_path / "prostate.json"
    assert datalist_command(["MSD", str(task), "--out", str(datalist), "--channel", "1", "--check",
                             "--no-progress"]) == 0
    items = [item for split in json.loads(datalist.read_text()).values() for item in split]
    assert len(items) == 3 and {item["channel"] for item in items} == {1}
    capsys.readouterr()
    out = tmp_path / "eval"
    assert main(["evaluate", "--datalist", str(datalist), "--checkpoint", "tiny", "--split", "all", "--out", str(out),
                 "--no-progress", "--no-mlflow", "--overlays", "0"]) == 0
    assert len((out / "cases.csv").read_text().strip().splitlines()) == 1 + 3 * 2  # 3 cases x 2 prompts
    assert "4D images: channel MSD_Task05_Prostate: 1 " in (out / "table.md").read_text()  # the report names it
    masks = tmp_path / "masks"
    assert main(["segment", "--datalist", str(datalist), "--split", "training", "--out-dir", str(masks),
                 "--tracker", "none", "--no-progress"]) == 0
    written = sorted(masks.glob("*_seg.nii.gz"))
    assert written and all(nib.load(path).shape == nib.load(source / "masks" / path.name.replace("_seg", "")).shape
                           for path in written)
    assert {json.loads(Path(f"{path}.json").read_text())["channel"] for path in written} == {1}
    with pytest.raises(DatalistError, match="--channel 0 given, but these images have no channels to choose from"):
        build_datalist("MSD_Task04_Hippocampus", source, channel=0)
    # every image's header is read against --channel: one 3D volume among the 4D ones is named, not written
    odd = task / "imagesTr" / (sorted((source / "images").glob("*.nii.gz"))[0].name)
    odd.write_bytes((source / "images" / odd.name).read_bytes())
    with pytest.raises(DatalistError, match=rf"{odd.name}: channel 1 requested but the volume has 1 channel \(a 3D "
                                            r"volume\) \(--channel 1 was given for every item\)"):
        build_datalist("MSD", task, channel=1)


def test_msd_task_missing_from_the_catalogue_is_an_error(tmp_path: Path):
    task = tmp_path / "Task11_Unknown"
    task.mkdir()
    (task / "dataset.json").write_text(json.dumps({"name": "Unknown", "labels": {"0": "bg"}, "training": []}))
    with pytest.raises(DatalistError, match="MSD task 'Task11_Unknown'.*not in the catalogue"):
        build_datalist("MSD", task)


# ------------------------------------------------------------------ external sets: everything goes to test


def test_ph2_official(tmp_path: Path):
    base = tmp_path / "PH2Dataset" / "PH2 Dataset images"
    for case in ("IMD002", "IMD003"):
        img(base / case / f"{case}_Dermoscopic_Image" / f"{case}.bmp", mode="RGB")
        img(base / case / f"{case}_lesion" / f"{case}_lesion.bmp")
        (base / case / f"{case}_roi").mkdir()
    result = build("PH2", tmp_path)
    assert result.counts() == {"training": 0, "validation": 0, "test": 2}
    assert result.datalist["test"][0]["label"].endswith("IMD002_lesion.bmp")


def test_hc18_training_set_and_unlabelled_test_set(tmp_path: Path):
    for name in ("001_HC", "002_2HC"):
        img(tmp_path / "training_set" / f"{name}.png")
        img(tmp_path / "training_set" / f"{name}_Annotation.png")
    (tmp_path / "training_set_pixel_size_and_HC.csv").write_text("filename,pixel size(mm),head circumference (mm)\n")
    img(tmp_path / "test_set" / "003_HC.png")
    result = build("HC18", tmp_path)
    assert cases(result.datalist, "test") == ["001_HC", "002_2HC"]
    assert result.datalist["test"][0]["mask_encoding"] == "outline"
    assert [p.path.name for p in result.unlabelled] == ["003_HC.png"]


def test_cvc_clinicdb_prefers_png(tmp_path: Path):
    for folder, ext in (("PNG", "png"), ("TIF", "tif")):
        for n in (1, 2):
            img(tmp_path / "CVC-ClinicDB" / folder / "Original" / f"{n}.{ext}", mode="RGB")
            img(tmp_path / "CVC-ClinicDB" / folder / "Ground Truth" / f"{n}.{ext}")
    result = build("CVC-ClinicDB", tmp_path)
    assert cases(result.datalist, "test") == ["1", "2"]
    assert all("/PNG/" in item["image"] for item in result.datalist["test"])


def test_etis_larib_official(tmp_path: Path):
    for n in (1, 2):
        img(tmp_path / "ETIS-LaribPolypDB" / f"{n}.tif", mode="RGB")
        img(tmp_path / "GroundTruth" / f"p{n}.tif")
    result = build("ETIS-Larib", tmp_path)
    assert cases(result.datalist, "test") == ["1", "2"]
    assert result.datalist["test"][0]["label"].endswith("GroundTruth/p1.tif")


def test_tn3k_subsets_with_repeated_names(tmp_path: Path):
    for subset in ("trainval", "test"):
        img(tmp_path / f"{subset}-image" / "0000.jpg")
        img(tmp_path / f"{subset}-mask" / "0000.jpg")
    result = build("TN3K", tmp_path)
    assert cases(result.datalist, "test") == ["test/0000", "trainval/0000"]
    assert result.datalist["test"][0]["prompts"] == {"1": "thyroid nodule"}


def test_ddti_preprocessed_release(tmp_path: Path):
    for n in (1, 2):
        img(tmp_path / "image" / f"{n}.PNG", fmt="PNG")
        img(tmp_path / "mask" / f"{n}.PNG", fmt="PNG")
    assert build("DDTI", tmp_path).counts() == {"training": 0, "validation": 0, "test": 2}


def test_chase_db1_first_observer(tmp_path: Path):
    for case in ("Image_01L", "Image_01R"):
        img(tmp_path / f"{case}.jpg", mode="RGB")
        img(tmp_path / f"{case}_1stHO.png")
        img(tmp_path / f"{case}_2ndHO.png")
    result = build("CHASE_DB1", tmp_path)
    assert [Path(i["label"]).name for i in result.datalist["test"]] == ["Image_01L_1stHO.png", "Image_01R_1stHO.png"]


def test_stare_labels_ah_and_counts_unlabelled_images(tmp_path: Path):
    for n in (1, 2, 3):
        img(tmp_path / "stare-images" / f"im000{n}.ppm", mode="RGB", fmt="PPM")
    for n in (1, 2):
        img(tmp_path / "labels-ah" / f"im000{n}.ah.ppm", fmt="PPM")
    img(tmp_path / "labels-vk" / "im0001.vk.ppm", fmt="PPM")
    result = build("STARE", tmp_path)
    assert cases(result.datalist, "test") == ["im0001", "im0002"]
    assert result.datalist["test"][0]["label"].endswith("im0001.ah.ppm")
    assert [p.path.name for p in result.unlabelled] == ["im0003.ppm"]


def test_every_picture_a_converter_lists_is_read_as_a_picture(tmp_path: Path):
    """STARE's .ppm pairs load as 2D pictures (they went to ITK, which cannot read them: STARE was unevaluable)."""
    from medsam3_monai.data.converters._common import IMAGE_SUFFIXES
    from medsam3_monai.transforms import DecodeLabeld, LoadMedicalImaged
    from medsam3_monai.transforms.io import IMAGE_2D_SUFFIXES

    assert set(IMAGE_SUFFIXES) <= set(IMAGE_2D_SUFFIXES)
    img(tmp_path / "im0001.ppm", mode="RGB", fmt="PPM")
    label = np.zeros((6, 8, 3), dtype=np.uint8)
    label[2:4, 1:7] = 255  # Hoover's labels: white vessels
    Image.fromarray(label).save(tmp_path / "im0001.ah.ppm")
    item = build("STARE", tmp_path).datalist["test"][0]
    loaded = LoadMedicalImaged(keys=["image", "label"], label_keys=["label"])(item)
    loaded = DecodeLabeld(keys="label")(loaded)
    assert tuple(loaded["image"].shape) == (3, 6, 8)
    assert loaded["label"].shape[-2:] == (6, 8) and int(loaded["label"].sum()) == 12


def test_stare_gzip_files_must_be_decompressed(tmp_path: Path):
    (tmp_path / "im0001.ppm.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(DatalistError, match="gzip-compressed; run 'gunzip -r"):
        build_datalist("STARE", tmp_path)
    # half done: the pictures decompressed, labels-ah/ not (its images were "without a label" before)
    img(tmp_path / "stare-images" / "im0001.ppm", mode="RGB", fmt="PPM")
    (tmp_path / "im0001.ppm.gz").unlink()
    (tmp_path / "labels-ah").mkdir()
    (tmp_path / "labels-ah" / "im0001.ah.ppm.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(DatalistError, match=r"im0001\.ah\.ppm\.gz: 1 of the STARE files are gzip-compressed"):
        build_datalist("STARE", tmp_path)
    # gunzip -k: every .gz beside its plain file, which is read
    img(tmp_path / "labels-ah" / "im0001.ah.ppm", fmt="PPM")
    (tmp_path / "stare-images" / "im0001.ppm.gz").write_bytes(b"\x1f\x8b")
    assert cases(build("STARE", tmp_path).datalist, "test") == ["im0001"]


def test_an_archive_unpacked_into_a_folder_of_its_own_is_pointed_at_or_read(tmp_path: Path):
    """BUSI one folder further down (archive/Dataset_BUSI_with_GT) is named in the error; ISIC's split folders
    unzipped into folders of their own names are read; BUSI without a class folder names it."""
    base = tmp_path / "busi" / "archive" / "Dataset_BUSI_with_GT"
    for cls in ("benign", "malignant", "normal"):
        for n in (1, 2):
            img(base / cls / f"{cls} ({n}).png", mode="RGB")
            img(base / cls / f"{cls} ({n})_mask.png", mode="1")
    (tmp_path / "busi" / "__MACOSX").mkdir()
    with pytest.raises(DatalistError, match=r"not the expected layout.*\n.*busi/archive holds that layout \(an archive "
                                            r"unpacked into a folder of its own\): give that folder"):
        build_datalist("BUSI", tmp_path / "busi")
    assert sum(map(len, build("BUSI", tmp_path / "busi" / "archive").datalist.values())) == 6
    # a folder of several datasets: no other dataset's folder is offered (the first one that converted was)
    for name in ("aaa_other", "zzz_another"):
        _kvasir(tmp_path / "several" / name / "Kvasir-SEG")
    with pytest.raises(DatalistError) as error:
        build_datalist("Kvasir-SEG", tmp_path / "several")
    assert "holds that layout" not in str(error.value)
    for path in (base / "normal").iterdir():
        path.unlink()
    (base / "normal").rmdir()
    with pytest.raises(DatalistError, match=r"has benign/, malignant/ but no normal/: BUSI as published has all three"):
        build_datalist("BUSI", base)
    for part in ("Training", "Validation"):
        for i in ("0000001", "0000002"):
            name = f"ISIC2018_Task1-2_{part}_Input"
            img(tmp_path / "isic" / name / name / f"ISIC_{part[0]}{i}.jpg", mode="RGB")
            name = f"ISIC2018_Task1_{part}_GroundTruth"
            img(tmp_path / "isic" / name / name / f"ISIC_{part[0]}{i}_segmentation.png")
    datalist = build("ISIC2018", tmp_path / "isic").datalist
    assert len(datalist["training"]) + len(datalist["validation"]) == 4


# ------------------------------------------------------------------ bad input


def test_unknown_name_lists_known_converters(tmp_path: Path):
    expected = r"unknown dataset or converter 'NoSuch'; known converters: BUSI, CHASE_DB1, .*TN3K"
    with pytest.raises(DatalistError, match=expected):
        build_datalist("NoSuch", tmp_path)
    with pytest.raises(DatalistError, match="dataset GOALS is catalogued but no converter reads its layout"):
        build_datalist("GOALS", tmp_path)


def test_empty_or_missing_folder(tmp_path: Path):
    with pytest.raises(DatalistError, match="dataset folder is empty. Expected Kvasir-SEG/images"):
        build_datalist("Kvasir-SEG", tmp_path)
    with pytest.raises(DatalistError, match="dataset folder not found"):
        build_datalist("Kvasir-SEG", tmp_path / "absent")


def test_wrong_layout_names_the_expected_one(tmp_path: Path):
    img(tmp_path / "random.png")
    with pytest.raises(DatalistError, match=r"not the expected layout. Expected Dataset_BUSI_with_GT"):
        build_datalist("BUSI", tmp_path)


def _kvasir(tmp_path: Path, names=("a", "b", "c")) -> Path:
    for name in names:
        img(tmp_path / "images" / f"{name}.jpg", mode="RGB")
        img(tmp_path / "masks" / f"{name}.jpg")
    return tmp_path


def test_image_without_mask_is_an_error_or_a_counted_skip(tmp_path: Path):
    _kvasir(tmp_path)
    img(tmp_path / "images" / "lonely.jpg", mode="RGB")
    img(tmp_path / "masks" / "orphan.jpg")
    expected = r"(?s)2 problem\(s\).*lonely.jpg: no mask found.*orphan.jpg: mask without a matching image"
    with pytest.raises(DatalistError, match=expected):
        build_datalist("Kvasir-SEG", tmp_path)
    result = build("Kvasir-SEG", tmp_path, skip_bad=True)
    assert sum(result.counts().values()) == 3
    assert {p.path.name for p in result.skipped} == {"lonely.jpg", "orphan.jpg"}
    assert "2 skipped (bad input)" in result.summary()


def test_mask_size_mismatch_is_caught_from_headers(tmp_path: Path):
    _kvasir(tmp_path)
    img(tmp_path / "masks" / "b.jpg", size=(9, 6))
    with pytest.raises(DatalistError, match=r"masks/b.jpg: mask size \(6, 9\) differs from image b.jpg \(6, 8\)"):
        build_datalist("Kvasir-SEG", tmp_path)


def test_a_volume_mask_transposed_on_its_images_grid_passes_the_header_check(tmp_path: Path):
    """A mask saved with its array axes in another order and its header's in the same (the same world grid): the
    loader transposes it onto the image, so the datalist takes it; one whose header does not say so is refused."""
    for number in (1, 2):
        vol(tmp_path / "images" / f"hippocampus_00{number}.nii.gz", shape=(4, 5, 3))
    data = np.zeros((3, 4, 5), dtype=np.uint8)
    data[1, 2, 3] = 1
    affine = np.eye(4)[:, [2, 0, 1, 3]]  # array axis 0 runs along the image's axis 2, and so on
    (tmp_path / "masks").mkdir()
    nib.Nifti1Image(data, affine).to_filename(str(tmp_path / "masks" / "hippocampus_001.nii.gz"))
    nib.Nifti1Image(data, np.eye(4)).to_filename(str(tmp_path / "masks" / "hippocampus_002.nii.gz"))
    with pytest.raises(DatalistError, match=r"hippocampus_002.nii.gz: mask size \(3, 4, 5\) differs from image"
                       ) as raised:
        build_datalist("MSD_Task04_Hippocampus_cropped", tmp_path)
    assert "hippocampus_001" not in str(raised.value)
    nib.Nifti1Image(data[0], np.eye(4)).to_filename(str(tmp_path / "masks" / "hippocampus_002.nii.gz"))  # a 2D mask
    with pytest.raises(DatalistError, match=r"hippocampus_002.nii.gz: mask size \(4, 5\) differs from image"):
        build_datalist("MSD_Task04_Hippocampus_cropped", tmp_path)


def test_label_value_missing_from_the_catalogue(tmp_path: Path):
    vol(tmp_path / "images" / "hippocampus_001.nii.gz", values=(5,))
    vol(tmp_path / "masks" / "hippocampus_001.nii.gz", values=(1, 2, 7))
    vol(tmp_path / "images" / "hippocampus_002.nii.gz")
    vol(tmp_path / "masks" / "hippocampus_002.nii.gz")
    expected = r"hippocampus_001.nii.gz: label value\(s\) \[7\] are not in the catalogue entry MSD_Task04_Hippocampus"
    with pytest.raises(DatalistError, match=expected):
        build_datalist("MSD_Task04_Hippocampus_cropped", tmp_path)
    assert build("MSD_Task04_Hippocampus_cropped", tmp_path, check_values=False).counts()["training"] == 1


def test_cli_reports_errors_without_writing(tmp_path: Path, capsys):
    out = tmp_path / "out.json"
    assert datalist_command(["NoSuch", str(tmp_path), "--out", str(out)]) == 2
    assert "unknown dataset or converter 'NoSuch'" in capsys.readouterr().err
    _kvasir(tmp_path / "kvasir")
    img(tmp_path / "kvasir" / "images" / "lonely.jpg", mode="RGB")
    assert datalist_command(["Kvasir-SEG", str(tmp_path / "kvasir"), "--out", str(out)]) == 2
    assert not out.exists()
    argv = ["Kvasir-SEG", str(tmp_path / "kvasir"), "--out", str(out), "--skip-bad", "--relative-to", str(tmp_path)]
    assert datalist_command(argv) == 0
    assert "1 skipped (bad input):" in capsys.readouterr().err
    written = json.loads(out.read_text())
    assert written["training"][0]["image"].startswith("kvasir/images/")


def test_cli_list_names_every_converter(capsys):
    assert datalist_command(["--list"]) == 0
    listing = capsys.readouterr().out
    for name in ("BUSI", "MSD", "MSD_Task04_Hippocampus", "TotalSegmentator_example_CT_MR", "STARE"):
        assert name in listing


def test_check_alone_checks_a_datalist_one_has(shared_data: Path, tmp_path: Path, capsys):
    """``medsam3 datalist --check FILE``: a hand-written datalist (relative paths, read from its folder) against what
    the readers take, then decoded item by item; a schema violation and an undecodable mask are named, exit 2."""
    import shutil

    folder = tmp_path / "mine"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    source = shared_data / "Kvasir-SEG_sample"
    name = sorted((source / "images").glob("*.jpg"))[0].name
    shutil.copy(source / "images" / name, folder / "images" / name)
    shutil.copy(source / "masks" / name, folder / "masks" / name)
    item = {"image": f"images/{name}", "label": f"masks/{name}", "dataset": "MyPolyps", "modality": "endoscopy",
            "prompts": {"1": "polyp"}, "instance_rule": "components", "mask_encoding": "binary", "case": "a"}
    datalist = folder / "mine.json"
    datalist.write_text(json.dumps({"training": [item], "validation": [], "test": []}))
    assert datalist_command(["--check", str(datalist), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "every image and mask decodes" in err
    assert "the 'validation' list is empty: the training bundle trains without validation" in err
    datalist.write_text(json.dumps({"test": [item]}))  # splits left out are empty, as evaluate reads them
    assert datalist_command(["--check", str(datalist), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "every image and mask decodes" in err  # the training bundle needs its lists, though: said
    assert "note: " in err and "no 'training' list: the training bundle refuses the datalist without one" in err
    assert "no 'validation' list" in err
    datalist.write_text(json.dumps({"training": [item], "validation": [item]}))  # one image in two splits
    assert datalist_command(["--check", str(datalist), "--no-progress"]) == 0
    assert f"1 image(s) in both 'training' and 'validation' (e.g. images/{name})" in capsys.readouterr().err
    datalist.write_text(json.dumps({"training": [item], "validation": [item], "test": [item]}))  # in all three
    assert datalist_command(["--check", str(datalist), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert all(f"1 image(s) in both {a!r} and {b!r}" in err for a, b in
               [("training", "validation"), ("training", "test"), ("validation", "test")]), err
    datalist.write_text(json.dumps({"training": [], "validation": []}))
    assert datalist_command(["--check", str(datalist), "--no-progress"]) == 2
    assert "holds no items" in capsys.readouterr().err
    # a NIfTI whose gzip stream still inflates but fails its CRC: read as voxels by the loaders, refused here
    volume = shared_data / "MSD_Task04_Hippocampus_cropped" / "images" / "hippocampus_001.nii.gz"
    garbled = bytearray(volume.read_bytes())
    garbled[len(garbled) // 2:len(garbled) // 2 + 64] = bytes(64)
    (folder / "garbled.nii.gz").write_bytes(garbled)
    mask = str(volume).replace("images", "masks")
    datalist.write_text(json.dumps({"test": [{"image": "garbled.nii.gz", "label": mask, "dataset": "H",
                                              "modality": "MRI", "prompts": {"1": "anterior hippocampus"}}]}))
    assert datalist_command(["--check", str(datalist), "--no-progress"]) == 2
    assert "garbled.nii.gz: is corrupt: its gzip data fails gzip's own check (BadGzipFile: CRC check failed" in \
        capsys.readouterr().err
    hippocampus = shared_data / "MSD_Task04_Hippocampus_cropped"
    volume = {"image": str(hippocampus / "images" / "hippocampus_001.nii.gz"), "spacing": [2.0, 2.0],
              "label": str(hippocampus / "masks" / "hippocampus_001.nii.gz"), "prompts": {"1": "a", "2": "b"}}
    datalist.write_text(json.dumps({"training": [volume], "validation": []}))
    assert datalist_command(["--check", str(datalist), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "1 volume item(s) carry 'spacing'" in err and "in no mask" not in err
    datalist.write_text(json.dumps({"training": [dict(volume, prompts={"1": "   "})], "validation": []}))
    assert datalist_command(["--check", str(datalist), "--no-progress"]) == 2  # named with its item, not the mask
    assert f"{datalist}: training item 1: 'prompts' {{'1': '   '}} give no concept text" in capsys.readouterr().err
    # a prompt whose label value no mask holds: said before any training (evaluate says it after)
    absent = dict(volume, prompts={"1": "a", "2": "b", "3": "amygdala"}, dataset="Hippo")
    datalist.write_text(json.dumps({"training": [absent, absent], "validation": []}))
    assert datalist_command(["--check", str(datalist), "--no-progress"]) == 0
    assert "note: " + str(datalist) + ": dataset Hippo: label value 3 (prompt 'amygdala') is in no mask of its 1 " \
           "item(s), so its prompts are trained only as absent concepts (negative prompts)" in capsys.readouterr().err
    assert datalist_command(["--check", str(folder), "--no-progress"]) == 2
    assert f"datalist {folder} is a folder: give the datalist's JSON file" in capsys.readouterr().err
    assert datalist_command(["--check", str(datalist), "--channel", "1"]) == 2  # not silently ignored
    assert "--channel goes with NAME ROOT" in capsys.readouterr().err
    assert datalist_command(["--check", str(datalist), "--seed", "7", "--overwrite"]) == 2
    assert "--seed and --overwrite go with NAME ROOT" in capsys.readouterr().err
    datalist.write_text(json.dumps({"training": [dict(item, dataset=None)], "validation": [], "test": []}))
    assert datalist_command(["--check", str(datalist), "--no-progress"]) == 2
    assert "does not match its schema" in capsys.readouterr().err
    # what evaluate and the bundles read is what the check takes: only image, label and prompts are required, the
    # modality in any spelling, a 2D item's spacing; a modality nobody knows is named with the known ones
    minimal = {"image": item["image"], "label": item["label"], "prompts": {"1": "polyp"}}
    datalist.write_text(json.dumps({"test": [minimal, dict(minimal, modality="Endoscopy", spacing=[0.5, 0.5])]}))
    assert datalist_command(["--check", str(datalist), "--no-progress"]) == 0
    assert "every image and mask decodes" in capsys.readouterr().err
    datalist.write_text(json.dumps({"test": [dict(minimal, modality="Endoscpy"), dict(minimal, spacing=[0, 1])]}))
    assert datalist_command(["--check", str(datalist), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "$.test[1].spacing[0]" in err and "Endoscpy" not in err  # the schema first, then the modality
    datalist.write_text(json.dumps({"test": [dict(minimal, modality="Endoscpy")]}))
    assert datalist_command(["--check", str(datalist), "--no-progress"]) == 2
    assert "$.test[0].modality: 'Endoscpy' is not a modality the intensity step knows" in capsys.readouterr().err
    datalist.write_text(json.dumps({"training": [item], "validation": [], "test": []}))
    (folder / "masks" / name).write_bytes((folder / "masks" / name).read_bytes()[:200])  # truncated
    assert datalist_command(["--check", str(datalist), "--no-progress"]) == 2
    assert name in capsys.readouterr().err


def test_training_datalists_with_a_missing_file_are_named(tmp_path: Path):
    """The training bundle's loader (load_datalists) names the datalist whose file is not there, before caching."""
    from medsam3_monai.data import load_datalists

    img(tmp_path / "images" / "a.png")
    img(tmp_path / "masks" / "a.png")
    item = {"image": "images/a.png", "label": "masks/a.png", "dataset": "Mine", "prompts": {"1": "polyp"}}
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps({"training": [item], "validation": [], "test": []}))
    bad.write_text(json.dumps({"training": [dict(item, label="masks/b.png")], "validation": [], "test": []}))
    assert len(load_datalists([good], "training")) == 1
    with pytest.raises(FileNotFoundError, match=r"1 image/label file\(s\) of datalist .*bad.json \(training\) not "
                                                r"found:\n  .*masks/b.png"):
        load_datalists([good, bad], "training")
    assert len(load_datalists([good, bad], "training", check_files=False)) == 2
