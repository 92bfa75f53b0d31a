"""Large 2D inputs: refusal before decoding (size limit, PIL's decompression-bomb limit, available memory), the
tiled slice-space resize and inverse against MONAI's eager ones, progress bars, and the NIfTI writer keeping a
2D input's shape and its qform/sform codes. Small pictures stand in for large ones (the tiled preprocessing is
forced by lowering ``EAGER_MAX_PIXELS``; every 2D picture's and volume slice's inverse is deferred to the merge,
whatever its size);
the memory itself is measured by ``scripts/bench_memory.py``."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd
from PIL import Image

import medsam3_monai.inferers.postprocess as postprocess
import medsam3_monai.transforms.slices as slices
from medsam3_monai.deploy.cli import main
from medsam3_monai.inferers.bitmasks import BitMasks
from medsam3_monai.inferers.postprocess import InvertToInputd, MergePromptsd, materialize_inverse, pending_inverse
from medsam3_monai.transforms import (
    AxialSlicesd,
    DataError,
    GreyToRGBd,
    LoadMedicalImaged,
    ResizeToSliced,
    Sam3Normalized,
    ScaleIntensityByModalityd,
    TiledResizeToSliced,
    load_medical_image,
)
from medsam3_monai.transforms.intensity import materialize_intensity, pending_intensity, row_tiles
from medsam3_monai.transforms.slices import bilinear_weights, upsample_rows

pytestmark = pytest.mark.usefixtures("one_thread")

S = 112


def picture(path: Path, height: int = 200, width: int = 300, mode: str = "RGB", seed: int = 0) -> Path:
    """A smooth picture with a bright disc and some noise (PNG, rows first)."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    base = 80 + 60 * np.sin(rows / height * 5) * np.cos(cols / width * 3)
    disc = (rows - 0.4 * height) ** 2 + (cols - 0.6 * width) ** 2 < (0.25 * min(height, width)) ** 2
    rgb = np.stack([base, base * 0.8 + 30, 200 - base * 0.5], -1) + rng.normal(0, 6, (height, width, 3))
    rgb[disc] = 235
    Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).convert(mode).save(path)
    return path


def segment(*args: str) -> int:
    return main(["segment", *args])


@pytest.fixture()
def tiled(monkeypatch):
    """Every 2D picture takes the tiled preprocessing (as a picture of more than EAGER_MAX_PIXELS would)."""
    monkeypatch.setattr(slices, "EAGER_MAX_PIXELS", 0)


# ------------------------------------------------------------------------------------------------ refusal
def test_a_picture_over_the_limit_is_refused_in_one_line_with_exit_2_and_no_output(tmp_path, capsys):
    source = picture(tmp_path / "big.png")
    out = tmp_path / "out" / "mask.png"
    code = segment(str(source), "--prompt", "disc", "--out", str(out), "--max-pixels", "1000", "--no-progress")
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().count("\n") == 0, err
    assert "300x200 picture (0.1 Mpx" in err and "exceeds the limit of 1000 pixels" in err
    assert "--max-pixels 60000" in err and "MEDSAM3_MAX_PIXELS" in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.rglob(".medsam3-segment-*"))
    # the limit is inclusive (the picture has exactly 6e4 pixels); 0, a negative count or under one pixel is refused
    assert segment(str(source), "--prompt", "disc", "--out", str(out), "--max-pixels", "6e4", "--no-progress") == 0
    for bad in ("0", "-5", "0.4"):
        with pytest.raises(SystemExit) as exit_info:
            segment(str(source), "--prompt", "disc", "--out", str(tmp_path / "bad.png"), "--max-pixels", bad)
        assert exit_info.value.code == 2 and "give a positive number of pixels" in capsys.readouterr().err
    assert not (tmp_path / "bad.png").exists()


def test_the_environment_variable_sets_the_limit_too(tmp_path, capsys, monkeypatch):
    source = picture(tmp_path / "big.png")
    monkeypatch.setenv("MEDSAM3_MAX_PIXELS", "1000")
    assert segment(str(source), "--prompt", "disc", "--out", str(tmp_path / "m.png"), "--no-progress") == 2
    assert "exceeds the limit of 1000 pixels" in capsys.readouterr().err
    with pytest.raises(DataError, match="exceeds the limit of 1000 pixels"):
        load_medical_image(source, max_pixels="auto")
    assert not (tmp_path / "m.png").exists()


def test_a_picture_that_would_not_fit_in_memory_is_refused_with_the_estimate(tmp_path, capsys, monkeypatch):
    import medsam3_monai.transforms.io as io

    source = picture(tmp_path / "big.png")
    monkeypatch.setattr(io, "available_memory", lambda: 100_000)  # 100 kB free
    assert segment(str(source), "--prompt", "disc", "--out", str(tmp_path / "m.png"), "--no-progress") == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0, err
    assert "does not fit in" in err and "of memory available" in err and "bytes/pixel" in err
    assert "--max-pixels 60000" in err
    assert not (tmp_path / "m.png").exists()
    # an explicit limit is the user's call: no memory check then
    assert segment(str(source), "--prompt", "disc", "--out", str(tmp_path / "m.png"), "--max-pixels", "60000",
                   "--no-progress") == 0


def test_a_picture_over_pils_limit_is_not_called_corrupt_and_the_option_allows_it(tmp_path, capsys, monkeypatch):
    source = picture(tmp_path / "big.png")  # 60 000 pixels, more than twice the limit below: PIL itself refuses it
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    with pytest.raises(DataError) as caught:
        load_medical_image(source)
    message = str(caught.value)
    assert "larger than PIL's decompression-bomb limit of 20000 pixels" in message and "not corrupt" in message
    assert "--max-pixels 60000" in message and "re-download" not in message and "corrupt, truncated" not in message

    out = tmp_path / "mask.png"
    assert segment(str(source), "--prompt", "disc", "--out", str(out), "--no-progress") == 2
    err = capsys.readouterr().err
    assert "decompression-bomb limit" in err and "re-download" not in err and not out.exists()

    assert segment(str(source), "--prompt", "disc", "--out", str(out), "--max-pixels", "60000", "--no-progress") == 0
    assert Image.MAX_IMAGE_PIXELS == 10_000, "PIL's limit is lifted for the one file only"
    loaded = load_medical_image(source, max_pixels=60_000)
    assert tuple(loaded.shape) == (3, 200, 300)
    assert tuple(load_medical_image(out, mask=True, max_pixels=60_000).shape) == (1, 200, 300)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_a_picture_copied_strip_by_strip_is_the_picture(tmp_path, monkeypatch, mode):
    """Pictures over ``STRIP_PIXELS`` leave PIL strip by strip (a ragged last strip too), smaller ones whole: the
    same (C, H, W) pixels as numpy's copy of the decoded picture."""
    import medsam3_monai.transforms.io as io

    path = picture(tmp_path / "p.png", height=53, width=40, mode=mode)
    expected = np.asarray(Image.open(path))
    expected = np.moveaxis(expected, -1, 0) if expected.ndim == 3 else expected[None]
    for strip_pixels in (io.STRIP_PIXELS, 40 * 10, 1):
        monkeypatch.setattr(io, "STRIP_PIXELS", strip_pixels)
        loaded = load_medical_image(path, keep_uint8=True)
        assert loaded.dtype == torch.uint8 and np.array_equal(loaded.numpy(), expected), strip_pixels


def test_a_corrupt_picture_is_still_called_corrupt(tmp_path):
    path = picture(tmp_path / "cut.png")
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(DataError, match="corrupt, truncated"):
        load_medical_image(path, max_pixels="auto")


# ------------------------------------------------------------------------------------------------ the 2D path
def inference_chain(size: int = S, kernel: str = "sam3") -> Compose:
    """The preprocessing of configs/inference.json (2D part), with the resize ``kernel``."""
    return Compose([
        LoadMedicalImaged(keys="image", label_keys=(), keep_uint8=True, max_pixels="auto"),
        ScaleIntensityByModalityd(keys="image", defer_2d=True),
        AxialSlicesd(keys="image"),
        GreyToRGBd(keys="image"),
        TiledResizeToSliced(keys="image", spatial_size=size, kernel=kernel),
        Sam3Normalized(keys="image"),
    ])


def eager_chain(size: int = S) -> Compose:
    """The same steps with the ``"monai"`` kernel, each on the whole float image (MONAI's own ``Resize``)."""
    return Compose([
        LoadMedicalImaged(keys="image", label_keys=()),
        ScaleIntensityByModalityd(keys="image"),
        AxialSlicesd(keys="image"),
        GreyToRGBd(keys="image"),
        ResizeToSliced(keys="image", spatial_size=size),
        Sam3Normalized(keys="image"),
    ])


def _ops(image: MetaTensor) -> list[dict]:
    return [{k: v for k, v in op.items() if k != "id"} for op in image.applied_operations]


@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("modality", [None, "CT", "MRI", "X-ray"])
def test_the_native_picture_stays_uint8_and_the_monai_kernel_gives_monais_resize(tmp_path, mode, modality, monkeypatch):
    source = picture(tmp_path / "p.png", mode=mode)
    item = {"image": str(source), "modality": modality}
    loaded = LoadMedicalImaged(keys="image", label_keys=(), keep_uint8=True)(item)["image"]
    assert loaded.dtype == torch.uint8
    deferred = ScaleIntensityByModalityd(keys="image", defer_2d=True)({**item, "image": loaded})["image"]
    assert deferred.dtype == torch.uint8 and pending_intensity(deferred) is not None
    eager_scaled = ScaleIntensityByModalityd(keys="image")({**item, "image": loaded.float()})["image"]
    assert torch.equal(materialize_intensity(deferred).as_tensor(), eager_scaled.as_tensor())  # bit for bit

    eager = eager_chain()(item)[0]["image"]
    small = inference_chain(kernel="monai")(item)[0]["image"]  # 60 000 pixels: MONAI's own resize
    assert torch.equal(small.as_tensor(), eager.as_tensor()) and _ops(small) == _ops(eager)
    monkeypatch.setattr(slices, "EAGER_MAX_PIXELS", 0)
    chain = inference_chain(kernel="monai")
    tiled = chain(item)[0]["image"]
    assert tuple(tiled.shape) == (3, S, S) and tiled.dtype == torch.float32
    assert torch.allclose(tiled.as_tensor(), eager.as_tensor(), atol=2 * (1 / 255) / 0.5)  # at most one grey level
    assert (tiled.as_tensor() != eager.as_tensor()).float().mean() < 0.002
    assert _ops(tiled) == _ops(eager) and torch.equal(tiled.affine, eager.affine)
    assert pending_intensity(tiled) is None and tiled.meta["intensity"] == eager.meta["intensity"]
    back = Invertd(keys="pred", transform=chain, orig_keys="image", nearest_interp=False)(
        {"pred": MetaTensor(torch.zeros(1, S, S)), "image": tiled})["pred"]
    assert tuple(back.shape) == (1, 200, 300) and torch.allclose(back.affine, torch.eye(4, dtype=back.affine.dtype))


@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("modality", [None, "CT", "X-ray"])
def test_the_sam3_kernel_is_torchvisions_resize_of_the_8_bit_picture_whole_or_in_tiles(tmp_path, mode, modality,
                                                                                       monkeypatch):
    """The default kernel: the picture's intensities mapped on the whole float picture, rounded to 8-bit levels and
    resized by torchvision's ``v2.Resize`` (SAM3's image processor), level for level; also through the tiled passes
    of a large picture (forced, in tiles of a few rows), with MONAI ``Resize``'s record."""
    from torchvision.transforms import v2

    from medsam3_monai.transforms.intensity import sam3_levels

    item = {"image": str(picture(tmp_path / "p.png", mode=mode)), "modality": modality}
    scaled = Compose([LoadMedicalImaged(keys="image", label_keys=()), ScaleIntensityByModalityd(keys="image"),
                      AxialSlicesd(keys="image"), GreyToRGBd(keys="image")])(item)[0]["image"]
    reference = v2.Resize((S, S))(sam3_levels(scaled))

    def levels() -> MetaTensor:
        chain = inference_chain()
        chain.transforms[-1].levels = True  # Sam3Normalized: keep the uint8 levels
        return chain(item)[0]["image"]

    whole = levels()
    assert whole.dtype == torch.uint8 and torch.equal(whole.as_tensor(), reference)
    resized = Compose(inference_chain().transforms[:-1])(item)[0]["image"]  # what an augmentation after it sees
    assert resized.dtype == torch.float32 and torch.equal(resized.as_tensor(), reference.float() / 255)
    assert _ops(whole) == _ops(eager_chain()(item)[0]["image"])  # MONAI Resize's record: Invertd inverts it
    passes = slices._uint8_resize_in_passes()
    monkeypatch.setattr(slices, "INTERPOLATE_MAX_PIXELS", 0)
    monkeypatch.setattr(slices, "_uint8_resize_in_passes", lambda: True)
    monkeypatch.setattr(slices, "row_tiles", lambda height, width, channels=1: row_tiles(height, width, channels,
                                                                                        elements=3000))
    tiled = levels()
    if passes:  # torchvision's integer passes on this CPU: the same levels
        assert torch.equal(tiled.as_tensor(), reference)
    else:  # torchvision resizes floats here and rounds once; the passes round twice
        assert int((tiled.as_tensor().int() - reference.int()).abs().max()) <= 1
    assert _ops(tiled) == _ops(whole)


def test_the_kernel_is_one_of_the_two():
    with pytest.raises(ValueError, match="kernel must be one of 'sam3', 'monai', got 'bicubic'"):
        TiledResizeToSliced(keys="image", spatial_size=S, kernel="bicubic")


@pytest.mark.parametrize("tile_elements", [slices.RESIZE_TILE_ELEMENTS, 3000])
def test_the_tiled_resize_equals_monais_before_quantisation(monkeypatch, tile_elements):
    """(Small tiles: a row block's band taller than a tile is summed tile by tile.)"""
    monkeypatch.setattr(slices, "EAGER_MAX_PIXELS", 0)
    monkeypatch.setattr(slices, "RESIZE_TILE_ELEMENTS", tile_elements)
    rng = np.random.default_rng(3)
    for height, width in [(300, 200), (90, 300), (1000, 999), (80, 60), (60, 1500)]:
        image = MetaTensor(torch.as_tensor(rng.integers(0, 256, (3, height, width), dtype=np.uint8)),
                           meta={"source_dtype": "uint8", "is_volume": False})
        eager = Compose([ScaleIntensityByModalityd(), ResizeToSliced(spatial_size=S)])({"image": image})["image"]
        tiled = Compose([ScaleIntensityByModalityd(defer_2d=True),
                         TiledResizeToSliced(spatial_size=S, kernel="monai")])({"image": image})["image"]
        assert torch.allclose(tiled.as_tensor(), eager.as_tensor(), atol=1e-6), (height, width)


def test_row_groups_cover_the_output_rows_in_order_within_the_tile():
    """The tiled resize makes each output row block from its whole band: groups of consecutive blocks whose input
    rows span at most the tile (a wider block alone), every block once, in order."""
    for in_size, out_size, sigma, rows in [(1348, 1008, 0.1687, 259), (4000, 1008, 1.4841, 40), (300, 1008, None, 7),
                                           (5000, 112, 21.8, 50)]:
        blocks = slices._resize_blocks(in_size, out_size, sigma)
        groups = slices._row_groups(blocks, rows)
        assert [b for _, _, group in groups for b in group] == list(blocks)
        for start, stop, group in groups:
            assert (start, stop) == (min(b[2] for b in group), max(b[3] for b in group))
            assert stop - start <= rows or len(group) == 1


def test_the_tiled_inverse_equals_the_untiled_one_and_interpolate():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, S, S, generator=generator) * 10
    for height, width in [(700, 900), (S, 500), (2000, 150)]:
        whole = upsample_rows(logits, (height, width), 0, height)
        columns = bilinear_weights(S, width)
        tiles = [upsample_rows(logits, (height, width), start, stop, columns)
                 for start, stop in row_tiles(height, width, 3, elements=20_000)]
        assert len(tiles) > 3 and torch.equal(torch.cat(tiles, dim=1), whole)
        reference = F.interpolate(logits[None], size=(height, width), mode="bilinear", align_corners=False)[0]
        assert torch.allclose(whole, reference, atol=1e-4, rtol=0)
        assert torch.equal(whole > 0, reference > 0)


def _case(image_path: Path, chain: Compose, prompts: int, seed: int = 0) -> list[dict]:
    """The slice items of a picture with seeded slice-space logits and scores, as PromptInferer leaves them."""
    items = chain({"image": str(image_path)})
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(prompts, 14, 14, generator=generator) * 6
    logits = F.interpolate(logits[None], size=(S, S), mode="bilinear", align_corners=False)[0]
    for item in items:
        item.update(pred=MetaTensor(logits.clone()), prompt_scores=torch.rand(prompts, generator=generator),
                    prompt_values=[3, 7, 250][:prompts])
    return items


def _old_post(chain: Compose) -> Compose:
    return Compose([Compose([Invertd(keys=["pred", "confidence"], transform=chain, orig_keys="image",
                                     nearest_interp=False, allow_missing_keys=True)]),
                    slices.RestackSlicesd(keys=["pred", "confidence"], ref_key="image"),
                    MergePromptsd(keys="pred", confidence_key="confidence")], map_items=False)


def _new_post(chain: Compose) -> Compose:
    """The bundle's own ``to_input_space`` (configs/inference.json) for cases made by ``chain``."""
    from medsam3_monai.bundle import inference_postprocessing

    return inference_postprocessing(chain)


@pytest.mark.parametrize("prompts", [1, 3])
def test_the_deferred_inverse_and_merge_give_the_label_map_of_invertd(tmp_path, tiled, prompts):
    source = picture(tmp_path / "p.png")
    chain = inference_chain()
    items = _case(source, chain, prompts)
    deferred = InvertToInputd(keys="pred", transform=chain, orig_keys="image", nearest_interp=False)(items[0])
    assert pending_inverse(deferred["pred"]) == (200, 300) and tuple(deferred["pred"].shape) == (prompts, S, S)
    old = _old_post(chain)([dict(i) for i in items])["pred"]
    new = _new_post(chain)([dict(i) for i in items])["pred"]
    assert new.dtype == old.dtype and tuple(new.shape) == (1, 200, 300)
    assert torch.equal(new.as_tensor(), old.as_tensor())
    assert torch.equal(new.affine, old.affine) and set(new.meta) == set(old.meta)
    assert len(torch.unique(new)) > 1, "the case exercises masks (and, with 3 prompts, overlaps)"
    full = materialize_inverse(deferred["pred"])
    inverted = Invertd(keys="pred", transform=chain, orig_keys="image", nearest_interp=False)(dict(items[0]))["pred"]
    assert torch.allclose(full.as_tensor(), inverted.as_tensor(), atol=1e-5) and torch.equal(full.affine,
                                                                                                inverted.affine)


def test_several_maps_of_a_prompt_are_united_after_the_inverse(tmp_path, tiled):
    """A 2D ``threshold`` case carries each kept query's map and, in ``kept_prompts``, the prompt of each: the deferred
    way back gives the label map of MONAI ``Invertd`` on every map followed by the union of each prompt's masks (its
    largest logit) and the merge by confidence; a prompt's maps must come together."""
    source = picture(tmp_path / "p.png")
    chain = inference_chain()
    items = _case(source, chain, 3)  # three maps ...
    for item in items:  # ... of two prompts
        item.update(kept_prompts=[0, 0, 1], prompt_scores=item["prompt_scores"][:2], prompt_values=[3, 7])
    old = _old_post(chain)([dict(i) for i in items])["pred"]
    new = _new_post(chain)([dict(i) for i in items])["pred"]
    assert torch.equal(new.as_tensor(), old.as_tensor()) and set(torch.unique(new).tolist()) == {0, 3, 7}
    inverted = Invertd(keys="pred", transform=chain, orig_keys="image", nearest_interp=False)(dict(items[0]))["pred"]
    union, other = inverted[:2].amax(0) > 0, inverted[2] > 0
    assert not ((new[0] == 3) & ~union).any() and bool((new[0][union & ~other] == 3).all())
    assert bool((new[0][~union & other] == 7).all()) and bool((new[0][~union & ~other] == 0).all())
    assert "kept_prompts" not in _new_post(chain)([dict(i) for i in items])
    merge = MergePromptsd(keys="pred")
    with pytest.raises(ValueError, match=r"'kept_prompts' \[0, 1, 0\]: the maps of one prompt must come together"):
        merge(dict(items[0], kept_prompts=[0, 1, 0]))
    with pytest.raises(ValueError, match=r"'kept_prompts' names 2 prompts for 3 maps in 'pred'"):
        merge(dict(items[0], kept_prompts=[0, 1]))


def _blobs(generator: torch.Generator, count: int) -> torch.Tensor:
    """(count, S, S) bool: a disc per mask at random places (prompts' masks that overlap here and there)."""
    rows, cols = torch.meshgrid(torch.arange(S, dtype=torch.float32), torch.arange(S, dtype=torch.float32),
                                indexing="ij")
    centre, radius = torch.rand(count, 2, generator=generator) * S, 8 + torch.rand(count, generator=generator) * 25
    return (rows - centre[:, 0, None, None]) ** 2 + (cols - centre[:, 1, None, None]) ** 2 < radius[:, None, None] ** 2


@pytest.mark.parametrize("slice_shape", [(40, 30), (300, 260)])  # Invertd's / left to the merge
def test_small_pictures_and_volume_slices_give_invertds_label_maps(tmp_path, slice_shape):
    source = picture(tmp_path / "p.png")
    chain = inference_chain()
    items = _case(source, chain, 2)
    assert torch.equal(_new_post(chain)([dict(i) for i in items])["pred"].as_tensor(),
                       _old_post(chain)([dict(i) for i in items])["pred"].as_tensor())
    affine = torch.diag(torch.tensor([0.8, 0.7, 2.5, 1.0], dtype=torch.float64))
    volume = torch.rand(1, *slice_shape, 4, generator=torch.Generator().manual_seed(2)) * 400 - 100
    path = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(volume[0].numpy(), affine.numpy()), path)
    slice_items = chain({"image": str(path), "modality": "CT"})
    assert len(slice_items) == 4 and "slice_index" in slice_items[0]["image"].meta
    generator = torch.Generator().manual_seed(5)
    for z, item in enumerate(slice_items):  # noise with tied scores, then discs with scores of their own
        masks = torch.rand(2, S, S, generator=generator) > 0.5 if z < 2 else _blobs(generator, 2)
        scores = torch.tensor([0.7, 0.7] if z < 2 else [0.7, 0.6])
        item.update(pred=MetaTensor(torch.where(masks, 1e4, -1e4)),
                    confidence=MetaTensor(masks.float() * scores[:, None, None]),
                    prompt_values=[1, 2], prompt_scores=scores)
    inverted = InvertToInputd(keys=["pred", "confidence"], transform=chain, orig_keys="image",
                              nearest_interp=False)(dict(slice_items[0]))
    if slice_shape[0] * slice_shape[1] >= 2 * S * S:  # left to the merge; a smaller slice is Invertd's at once
        assert pending_inverse(inverted["pred"]) == slice_shape[::-1]  # a slice is (Y, X)
    else:
        assert pending_inverse(inverted["pred"]) is None and tuple(inverted["pred"].shape) == (2, *slice_shape[::-1])
    assert inverted["pred"].meta["slice_index"] == 0
    old = _old_post(chain)([dict(i) for i in slice_items])["pred"]
    new = _new_post(chain)([dict(i) for i in slice_items])["pred"]
    assert tuple(new.shape) == (1, *slice_shape, 4) and torch.equal(new.as_tensor(), old.as_tensor())
    assert torch.equal(new.affine, old.affine)
    assert len(torch.unique(new[..., 2:])) == 3, "background and both prompts on the slices of discs"


def test_a_volume_given_as_bit_masks_goes_back_slice_by_slice_to_the_label_map_of_its_float_maps(tmp_path,
                                                                                                monkeypatch):
    # PromptInferer hands a volume's slices over as views of its bit-packed masks + the slice's scores; the bundle's
    # chain keeps each slice's present masks packed and merges them at the slice's size before touching the next
    # slice (slices of 60 x 90: each mask resized inside its box, mask_merge), then restacks labels: the label volume
    # of the same chain with MONAI's Invertd on each slice's float maps, and of all the float maps restacked and
    # merged but for ties (a bilinear logit of 0 but for rounding, which ATen rounds differently for 3 channels on
    # one thread than for 2: these noisy masks have many)
    affine = torch.diag(torch.tensor([0.8, 0.7, 2.5, 1.0], dtype=torch.float64))
    volume = torch.rand(1, 90, 60, 5, generator=torch.Generator().manual_seed(3)) * 400 - 100
    path = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(volume[0].numpy(), affine.numpy()), path)
    chain = inference_chain()
    slice_items = chain({"image": str(path), "modality": "CT"})
    generator = torch.Generator().manual_seed(6)
    masks = torch.rand(3, len(slice_items), S, S, generator=generator) > 0.6  # (P, D, S, S)
    masks[1, :2] = False  # prompt 1 absent from slices 0 and 1: those slices carry the maps of prompts 0 and 2
    masks[:, 3] = False  # no prompt on slice 3: one empty map
    scores = torch.rand(3, len(slice_items), generator=generator)
    packed = BitMasks.pack(masks)
    assert packed.nbytes * 8 == masks.numel()  # S = 112: no padding bits
    case = dict(prompt_values=[1, 2, 5], prompt_scores=torch.tensor([0.7, 0.6, 0.5]))
    floats = [dict(item, pred=MetaTensor(torch.where(masks[:, z], 1e4, -1e4)),
                   confidence=MetaTensor(masks[:, z].float() * scores[:, z, None, None]), **case)
              for z, item in enumerate(slice_items)]
    packed_items = [dict(item, pred=packed[:, z], mask_scores=scores[:, z], **case)
                    for z, item in enumerate(slice_items)]
    old = _old_post(chain)(floats)["pred"]
    invertd_chain = _new_post(chain)
    for step in postprocess.transforms_of(invertd_chain):
        if isinstance(step, (postprocess.MaskLogitsd, InvertToInputd)):
            step.defer = False  # float maps of the present prompts, Invertd on every slice
    with_invertd = invertd_chain([dict(i) for i in packed_items])["pred"]
    calls = []
    for name in ("MaskLogitsd", "MergePromptsd"):
        cls = getattr(postprocess, name)
        monkeypatch.setattr(cls, "__call__", lambda self, d, _f=cls.__call__, _n=name: calls.append(
            (_n, [type(i["pred"]).__name__ for i in packed_items])) or _f(self, d))
    restacked = _new_post(chain)([dict(i) for i in packed_items])
    new = restacked["pred"]
    assert postprocess.KEPT_PROMPTS not in restacked  # read by the merge, then dropped
    assert tuple(new.shape) == (1, 90, 60, 5) and new.dtype == torch.uint8
    assert torch.equal(new.as_tensor(), with_invertd.as_tensor()) and torch.equal(new.affine, old.affine)
    inverted = Compose(_old_post(chain).transforms[:2], map_items=False)(floats)  # all float maps, restacked
    logits, confidence = inverted["pred"].as_tensor(), inverted["confidence"].as_tensor()
    ties = (logits.abs() <= 0.1).any(0)  # a bilinear logit within rounding (1e-5 x 1e4) of 0
    claims = torch.where(logits > 0, confidence, -torch.inf).topk(2, dim=0).values
    ties |= (claims[1] > -torch.inf) & (claims[0] - claims[1] <= 1e-6)
    assert not ((new.as_tensor()[0] != old.as_tensor()[0]) & ~ties).any()
    assert len(torch.unique(new)) == 4, "background, three prompts and their overlaps exercised"
    assert [name for name, _ in calls] == ["MaskLogitsd", "MergePromptsd"] * len(slice_items)  # slice by slice
    assert all(kinds == ["BitMasks"] * len(slice_items) for _, kinds in calls)  # the case's inputs stay packed
    pending = postprocess.MaskLogitsd(keys="pred", transform=chain)(dict(packed_items[0]))
    kept_bits = postprocess.pending_masks(pending["pred"])  # no float maps: the present masks, still packed
    assert torch.equal(kept_bits.unpack(), masks[[0, 2], 0]) and "confidence" not in pending
    assert torch.equal(pending["mask_scores"], scores[[0, 2], 0]) and pending[postprocess.KEPT_PROMPTS] == [0, 2]
    assert pending_inverse(pending["pred"]) == (60, 90) and pending["pred"].meta["slice_index"] == 0
    assert postprocess.InvertToInputd(keys="pred", transform=chain, orig_keys="image")(pending)["pred"] is \
        pending["pred"]  # already pending: passed on as is
    dense = Invertd(keys="pred", transform=chain, orig_keys="image", nearest_interp=False)(
        dict(slice_items[0], pred=MetaTensor(torch.where(masks[[0, 2], 0], 1e4, -1e4))))["pred"]
    assert torch.allclose(materialize_inverse(pending["pred"]).as_tensor(), dense.as_tensor(), atol=0.1)
    as_bool = postprocess.MaskLogitsd(keys="pred")(dict(packed_items[0], pred=masks[:, 0]))  # bool masks: the same
    as_bits = postprocess.MaskLogitsd(keys="pred")(dict(packed_items[0]))
    assert torch.equal(as_bool["pred"], as_bits["pred"]) and torch.equal(as_bool["confidence"], as_bits["confidence"])
    assert as_bits[postprocess.KEPT_PROMPTS] == [0, 2] and tuple(as_bits["pred"].shape) == (2, S, S)
    assert torch.equal(as_bits["confidence"][1], masks[2, 0].float() * scores[2, 0])  # prompt 2's score
    empty = postprocess.MaskLogitsd(keys="pred")(dict(packed_items[3]))
    assert empty[postprocess.KEPT_PROMPTS] == [0] and bool((empty["pred"] < 0).all())
    with pytest.raises(ValueError, match="mask_scores"):  # masks need their slice's scores
        postprocess.MaskLogitsd(keys="pred")({k: v for k, v in packed_items[0].items() if k != "mask_scores"})


def test_segment_cli_is_unchanged_for_small_pictures_and_shows_progress_only_for_large_ones(tmp_path, capsys,
                                                                                           monkeypatch):
    source = picture(tmp_path / "p.png")
    small = tmp_path / "small.png"
    assert segment(str(source), "--prompt", "disc", "--prompt", "background", "--out", str(small)) == 0
    assert "masks at" not in capsys.readouterr().err
    monkeypatch.setattr(slices, "INTERPOLATE_MAX_PIXELS", 0)  # the tiled passes (the sam3 kernel's large pictures)
    monkeypatch.setattr(slices, "_uint8_resize_in_passes", lambda: True)  # (also where torchvision resizes floats)
    monkeypatch.setattr(slices, "PROGRESS_MIN_PIXELS", 1000)
    monkeypatch.setattr(postprocess, "PROGRESS_MIN_PIXELS", 1000)
    large = tmp_path / "large.png"
    assert segment(str(source), "--prompt", "disc", "--prompt", "background", "--out", str(large)) == 0
    err = capsys.readouterr().err
    assert "p.png: 300x200 -> 112x112" in err and "p.png: masks at 300x200" in err  # width x height
    assert segment(str(source), "--prompt", "disc", "--prompt", "background", "--out", str(large), "--overwrite",
                   "--no-progress") == 0
    assert "masks at" not in capsys.readouterr().err
    labels_small, labels_large = np.asarray(Image.open(small)), np.asarray(Image.open(large))
    assert labels_large.shape == labels_small.shape == (200, 300)
    assert (labels_large != labels_small).mean() < 0.01  # the same up to float rounding of the network input


# ------------------------------------------------------------------------------------------------ NIfTI writer
@pytest.mark.parametrize("codes", [(0, 2), (1, 0), (0, 0)])
def test_a_2d_nifti_comes_back_2d_with_its_qform_and_sform_codes(tmp_path, codes):
    qform_code, sform_code = codes
    affine = np.array([[0.5, 0, 0, -10], [0, 0.6, 0, 4], [0, 0, 1.0, 0], [0, 0, 0, 1]])
    image = nib.Nifti1Image((np.random.default_rng(0).random((64, 64)) * 100).astype(np.float32), affine)
    image.set_qform(affine, code=qform_code)
    image.set_sform(affine, code=sform_code)
    source = tmp_path / "flat.nii.gz"
    nib.save(image, source)
    out = tmp_path / "labels.nii.gz"
    assert segment(str(source), "--prompt", "bright", "--out", str(out), "--no-progress") == 0
    written = nib.load(str(out))
    assert written.shape == (64, 64)
    assert int(written.header["qform_code"]) == qform_code and int(written.header["sform_code"]) == sform_code
    source_image = nib.load(str(source))
    assert np.allclose(written.affine, source_image.affine)
    assert json.loads(Path(f"{out}.json").read_text())["shape"] == [64, 64]


@pytest.mark.parametrize("in_size, out_size, sigma", [(1348, 1008, 0.1687), (4000, 1008, 1.4841), (529, 1008, None),
                                                      (5, 112, None), (300, 7, 3.0), (1, 9, None), (64, 64, 0.7)])
def test_the_banded_resize_operator_is_the_matrix_summed_tap_by_tap(in_size, out_size, sigma):
    """The resize operator is built as a band (no pass over the whole matrix): each entry is the float64 sum, tap by
    tap, of the dense construction (Gaussian taps x bilinear shares, zero padding), and the cached column blocks
    cover exactly the non-zero entries of their rows, rounded once to the tiled resize's float32."""
    from monai.networks.layers.convutils import gaussian_1d

    first, second, first_weight, second_weight = slices.bilinear_weights(in_size, out_size)
    kernel = (torch.ones(1, dtype=torch.float64) if sigma is None else
              gaussian_1d(torch.tensor(float(sigma)), truncated=4.0, approx="erf").double())
    radius = (kernel.numel() - 1) // 2
    expected = torch.zeros(out_size, in_size, dtype=torch.float64)
    for tap, weight in enumerate(kernel.tolist()):
        for centre, share in ((first, first_weight.double()), (second, second_weight.double())):
            for row, (column, part) in enumerate(zip((centre + tap - radius).tolist(), share.tolist())):
                if 0 <= column < in_size:
                    expected[row, column] += part * weight
    matrix = slices.resize_operator(in_size, out_size, sigma)
    assert matrix.dtype == torch.float64 and torch.equal(matrix, expected)
    rebuilt = torch.zeros_like(matrix, dtype=slices.RESIZE_DTYPE)
    for out_start, out_stop, in_start, in_stop, block in slices._resize_blocks(in_size, out_size, sigma):
        assert block.shape == (in_stop - in_start, out_stop - out_start) and block.is_contiguous()
        outside = matrix[out_start:out_stop].clone()
        outside[:, in_start:in_stop] = 0
        assert not outside.any()  # every non-zero entry of these rows is inside the block
        nonzero = matrix[out_start:out_stop].nonzero()[:, 1]
        assert nonzero.numel() == 0 or (int(nonzero.min()), int(nonzero.max()) + 1) == (in_start, in_stop)
        rebuilt[out_start:out_stop, in_start:in_stop] = block.T
    assert block.dtype == torch.float32 and torch.equal(rebuilt, matrix.float())
