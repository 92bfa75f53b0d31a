"""The private / unversioned APIs we use live in medsam3_monai.compat: these tests fail when they change."""

from __future__ import annotations

import inspect

import pytest
import torch
from ignite.engine import Engine, Events

from medsam3_monai import compat


def test_installed_transformers_is_a_supported_version():
    assert compat.transformers_version_problem() is None, compat.transformers_version_problem()


def test_a_network_built_under_an_untested_transformers_says_which_to_install(monkeypatch):
    """helper-90: transformers 5.18 in a user's environment failed deep inside ``Sam3Model`` with an AttributeError;
    the network now names the range it is tested with, once per process."""
    import transformers

    from medsam3_monai.networks import MedSAM3Net

    monkeypatch.setattr(compat, "SUPPORTED_TRANSFORMERS", (">=99.0", "<99.1"))  # the installed one is then untested
    compat.warn_unsupported_transformers.cache_clear()
    try:
        with pytest.warns(UserWarning, match=rf"transformers {transformers.__version__} is installed; .*"
                                             r"pip install 'transformers>=99.0,<99.1'"):
            MedSAM3Net("tiny")
    finally:
        compat.warn_unsupported_transformers.cache_clear()


def test_pyproject_pins_the_supported_transformers_range():
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    pinned = next(d for d in project["dependencies"] if d.startswith("transformers"))
    assert pinned.replace(" ", "") == "transformers" + ",".join(compat.SUPPORTED_TRANSFORMERS)


def test_tracker_session_api_is_the_one_we_drive():
    from transformers.models.sam3_tracker_video.modeling_sam3_tracker_video import Sam3TrackerVideoInferenceSession

    parameters = inspect.signature(Sam3TrackerVideoInferenceSession.__init__).parameters
    for name in ("video", "video_height", "video_width", "inference_device", "inference_state_device",
                 "video_storage_device", "dtype", "max_vision_features_cache_size"):
        assert name in parameters, name
    asked = []

    def features(index):
        asked.append(index)
        return [torch.full((4, 1, 8), float(index))]

    session = compat.tracker_session(2, 28, torch.device("cpu"), torch.float32, features=features,
                                     positions=[torch.zeros(4, 1, 8)])
    assert session.num_frames == 2 and asked == [], "features are made when asked"
    assert torch.equal(session.cache.get_vision_features(1)["vision_feats"][0], torch.full((4, 1, 8), 1.0))
    session.cache.get_vision_features(1)
    assert asked == [1], "the slice last asked for is kept (a step asks twice)"
    with pytest.raises(RuntimeError, match="pixels of slice 1"):
        session.get_frame(1)
    with pytest.raises(KeyError):
        session.processed_frames[2]
    for method in ("obj_id_to_idx", "add_mask_inputs", "remove_point_inputs"):
        assert callable(getattr(session, method)), method
    compat.add_mask_prompt(session, obj_id=1, frame_idx=0, mask=torch.ones(28, 28, dtype=torch.bool))
    assert session.obj_with_new_inputs == [1] and session.mask_inputs_per_obj[0][0].shape == (1, 1, 28, 28)
    compat.add_mask_prompt(session, obj_id=1, frame_idx=1, mask=torch.ones(3, 28, 28, dtype=torch.bool))
    assert session.mask_inputs_per_obj[0][1].shape == (3, 1, 28, 28), "a batch of prompts, one mask each"


def test_ignite_handlers_and_batch_skipping():
    seen = []
    engine = Engine(lambda e, batch: seen.append(batch))

    def skip_two(e):
        compat.skip_batches(e, 2)

    engine.add_event_handler(Events.ITERATION_COMPLETED(once=1), skip_two)
    engine.run([1, 2, 3, 4, 5], max_epochs=1, epoch_length=3)
    assert seen == [1, 4, 5], "batches 2 and 3 were drawn and dropped"
    assert any(getattr(h, "__wrapped__", h) is skip_two or "skip_two" in repr(h)
               for h in compat.attached_handlers(engine))
