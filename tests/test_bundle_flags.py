"""Yes/no settings on ``python -m monai.bundle run``'s command line: MONAI's parser passes ``--dac false`` as the text
'false' (only Python's ``False`` is a bool), which as a truthy string used to switch the setting on."""

from __future__ import annotations

import json
import re

import pytest

from medsam3_monai.bundle import BUNDLE_CONFIGS, config_parser, flag, resume_setting


def test_flags_read_every_spelling_and_refuse_the_rest():
    for value in (True, "true", "True", "YES", "on", "1", 1):
        assert flag(value, "dac") is True, value
    for value in (False, "false", "False", "no", "OFF", "0", 0):
        assert flag(value, "dac") is False, value
    with pytest.raises(ValueError, match="--dac 'maybe': give true or false"):
        flag("maybe", "dac")
    assert resume_setting("false") is False and resume_setting("True") is True and resume_setting(True) is True
    assert resume_setting("runs/checkpoints/checkpoint_iter4.pt") == "runs/checkpoints/checkpoint_iter4.pt"


@pytest.mark.parametrize("given, expected", [("false", False), ("False", False), (False, False), ("true", True)])
def test_the_training_bundle_reads_dac_false_as_off(given, expected):
    assert config_parser("train.json", dac=given).get_parsed_content("network_def").dac is expected


def test_every_yes_no_setting_of_the_bundles_is_read_through_flag():
    """A config that used ``@dac`` directly would take the text 'false' as true again."""
    texts = {path.name: path.read_text() for path in BUNDLE_CONFIGS.glob("*.json")}
    settings = {key for text in texts.values() for key, value in json.loads(text).items() if isinstance(value, bool)}
    assert {"dac", "box_prompts", "bf16", "resume", "compile", "mlflow"} <= settings
    for name, text in texts.items():
        text = re.sub(r"check_flags\([^)]*\)", "", text)  # initialize's check: it reads them through flag itself
        # resume: a flag or a checkpoint; save_execute_config: MONAI's, a flag or (with --tracking) the executed
        # config's path, which require_empty_output takes as it is (only a path counts)
        for key in settings - {"resume", "save_execute_config"}:
            raw = len(re.findall(rf"@{key}\b", text))
            read = len(re.findall(rf"medsam3_monai\.bundle\.flag\(@{key}, '{key}'\)", text))
            assert raw == read, f"{name}: @{key} used without medsam3_monai.bundle.flag"
    assert texts["train.json"].count("@resume") == texts["train.json"].count("resume_setting(@resume)") == 3


def test_a_misspelt_key_of_lr_or_scheduler_is_refused():
    from medsam3_monai.bundle import check_setting_keys

    parser = config_parser("train.json", **{"lr#detectr": 1e-4})
    with pytest.raises(ValueError, match="--lr#detectr: lr has no 'detectr' \\(did you mean 'detector'\\?\\); its keys "
                                         "are detector, vision"):
        check_setting_keys(lr=parser.get_parsed_content("lr"), scheduler=parser.get_parsed_content("scheduler"))
    check_setting_keys(lr={"detector": 1e-4}, scheduler={"timescale": 10})
    # the objective's and the dropout's keys are their consumers' fields (train.json names only some of them)
    check_setting_keys(loss_weights={"giou": 3.0}, loss_settings={"pos_weight": 5.0}, training_dropout={"dropout": 0})
    for setting, key, says in [("loss_weights", "gio", "did you mean 'giou'?"),
                               ("loss_settings", "semantik", "did you mean 'semantic'?"),
                               ("training_dropout", "dropuot", "did you mean 'dropout'?"),
                               ("matcher", "cost_clas", "did you mean 'cost_class'?"),
                               ("o2m_matcher", "top_k", "did you mean 'topk'?")]:
        with pytest.raises(ValueError, match=f"--{setting}#{key}: {setting} has no '{key}' \\({says}"):
            check_setting_keys(**{setting: {key: 1}})
    for config in ("train.json", "multi_gpu_train.json"):  # both bundles check before the data is cached
        text = (BUNDLE_CONFIGS / config).read_text()
        assert ("check_setting_keys(lr=@lr, scheduler=@scheduler, loss_weights=@loss_weights, loss_settings="
                "@loss_settings, training_dropout=@training_dropout, matcher=@matcher, o2m_matcher=@o2m_matcher)"
                ) in text
        assert "check_override_keys()" in text


def test_a_misspelt_setting_given_to_monai_bundle_run_is_refused():
    """MONAI's runner takes ``--max_epoch 1`` as a new key nothing reads (the default 10 epochs ran): the bundles
    refuse a --KEY that no config has, naming the close one; the runner's own arguments and nested keys pass."""
    from medsam3_monai.bundle import check_override_keys

    runner = ["/venv/lib/python3.11/site-packages/monai/bundle/__main__.py", "run", "--config_file", "train.json"]
    check_override_keys([*runner, "--max_epochs", "1", "--lr#detector", "1e-4", "--bundle_root=/tmp/x",
                         "--tracking", "mlflow", "--tracking_uri", "sqlite:///x.db", "--max_cases", "1"])
    with pytest.raises(ValueError, match="--max_epoch: the bundle has no setting 'max_epoch', so it would change "
                                         "nothing; did you mean --max_epochs\\?"):
        check_override_keys([*runner, "--max_epoch", "1"])
    with pytest.raises(ValueError, match="--batchsize"):
        check_override_keys([*runner, "--batchsize=1"])
    check_override_keys(["/usr/bin/pytest", "run", "--max_epoch", "1"])  # not the bundle runner: not looked at
    # a key of another config (the inference bundle's --datalist) changes nothing in a training run
    training = [runner[0], "run", "--config_file", str([str(BUNDLE_CONFIGS / "train.json"),
                                                         str(BUNDLE_CONFIGS / "multi_gpu_train.json")])]
    with pytest.raises(ValueError, match=r"--datalist: the bundle has no setting 'datalist'.*did you mean "
                                         r"--datalists\?"):
        check_override_keys([*training, "--datalists", "['a.json']", "--datalist", "b.json"])
    check_override_keys([*training, "--datalists", "['a.json']", "--tracking_uri", "sqlite:///x.db"])
    # fire reads None and MONAI's update_kwargs(ignore_none=True) drops it: the config's 0.1 would stay
    with pytest.raises(ValueError, match=r"--grad_clip_norm None: .*drops an override whose value is None.*0 turns"):
        check_override_keys([*runner, "--grad_clip_norm", "None"])
    with pytest.raises(ValueError, match=r"--ct_window None"):
        check_override_keys([*runner, "--max_epochs=2", "--ct_window=None"])
    check_override_keys([*runner, "--grad_clip_norm", "0", "--ct_window", "none-such"])  # values are not judged
    # the docs' augmentation recipe: a new key that another override reads is a definition
    chain = "$@loading + [@train#slicing] + @to_slice_space[:2] + [@augment] + @to_slice_space[2:]"
    check_override_keys([*runner, "--augment", "$monai.transforms.RandGaussianNoised(keys='image')",
                         "--train#preprocessing#transforms", chain])
    with pytest.raises(ValueError, match="--augmnt: the bundle has no setting 'augmnt'"):
        check_override_keys([*runner, "--augmnt", "$monai.transforms.RandGaussianNoised(keys='image')",
                             "--train#preprocessing#transforms", chain])
    with pytest.raises(ValueError, match="--augment: the bundle has no setting 'augment'"):  # read by itself alone
        check_override_keys([*runner, "--augment", "$@augment"])


def test_an_argument_its_components_callable_does_not_take_is_refused_naming_the_close_one(tmp_path, monkeypatch):
    """``--optimizer#position_embeding_scale`` failed after caching with a 71-line traceback; now one line naming
    the close argument. A replaced ``#_target_`` is the one asked (a custom loss's own argument passes)."""
    from medsam3_monai.bundle import check_override_keys

    runner = ["/venv/lib/python3.11/site-packages/monai/bundle/__main__.py", "run", "--config_file",
              str(BUNDLE_CONFIGS / "train.json")]
    check_override_keys([*runner, "--optimizer#position_embedding_scale", "1.0", "--lr_scheduler#cooldown_steps",
                         "3", "--loss#weights#bbox", "4"])
    with pytest.raises(ValueError, match=r"--optimizer#position_embeding_scale: medsam3_monai\.engines\."
                                         r"build_optimizer "
                                         r"takes no argument 'position_embeding_scale'; did you mean "
                                         r"--optimizer#position_embedding_scale\?"):
        check_override_keys([*runner, "--optimizer#position_embeding_scale", "1.0"])
    with pytest.raises(ValueError, match="SetCriterion takes no argument 'l2_weight'"):
        check_override_keys([*runner, "--loss#l2_weight", "0.5"])
    (tmp_path / "myloss.py").write_text("from medsam3_monai.losses import SetCriterion\n\n\n"
                                        "class WithL2(SetCriterion):\n"
                                        "    def __init__(self, *args, l2_weight=0.0, **kwargs):\n"
                                        "        super().__init__(*args, **kwargs)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    check_override_keys([*runner, "--loss#_target_", "myloss.WithL2", "--loss#l2_weight", "0.5"])
    # a whole block replaced by one lacking keys the configs read ("@lr::vision is not defined" before); blocks
    # passed whole (their callables' defaults fill the rest) and the keys read with a default are taken
    with pytest.raises(ValueError, match=r"--lr replaces the whole 'lr' block, and this one lacks vision, language, "
                                         r"geometry, layer_decay, weight_decay, which the bundle reads: give only the "
                                         r"keys you change, one each, e\.g\. --lr#detector VALUE"):
        check_override_keys([*runner, "--lr", "{'detector': 1e-4}"])
    check_override_keys([*runner, "--matcher", "{'cost_class': 1.0}", "--loss_weights", '{"bbox": 5.0}',
                         "--scheduler", '{"warmup_steps": 0, "timescale": 20}'])
    # a component replaced whole, then one of its arguments: the new one's, left to MONAI
    check_override_keys([*runner, "--optimizer", "{'_target_': 'torch.optim.SGD', 'params': '$@network.parameters()', "
                         "'lr': 0.1}", "--optimizer#momentum", "0.9"])
    # an extended bundle's own loss (a config after train.json replaces loss#_target_): its arguments count
    (tmp_path / "my_loss.json").write_text('{"loss": {"_target_": "myloss.WithL2", "weights": "@loss_weights"}}')
    extended = [runner[0], "run", "--config_file", str([str(BUNDLE_CONFIGS / "train.json"),
                                                         str(tmp_path / "my_loss.json")])]
    check_override_keys([*extended, "--loss#l2_weight", "0.5"])


def test_loss_settings_switches_read_false_as_off():
    loss = config_parser("train.json", **{"loss_settings#semantic": "false"}).get_parsed_content("loss")
    assert loss.config()["semantic"] is False and loss.config()["one_to_many"] is True


def test_the_matchers_costs_are_bundle_settings_with_sam3s_values():
    """``matcher`` / ``o2m_matcher`` build the criterion's matchers (SAM3's costs by default) and reach MLflow
    through ``loss.config()``."""
    from medsam3_monai.losses import HungarianMatcher, OneToManyMatcher

    loss = config_parser("train.json").get_parsed_content("loss")
    assert loss.matcher.settings() == HungarianMatcher().settings() == {
        "cost_class": 2.0, "cost_bbox": 5.0, "cost_giou": 2.0, "alpha": 0.25, "gamma": 2.0}
    assert loss.o2m_matcher.settings() == OneToManyMatcher().settings() == {"alpha": 0.3, "threshold": 0.4, "topk": 4}
    changed = config_parser("train.json", **{"matcher#cost_class": 3.0, "o2m_matcher#topk": 2}).get_parsed_content(
        "loss")
    assert changed.matcher.cost_class == 3.0 and changed.o2m_matcher.topk == 2
    assert changed.config()["matcher_cost_class"] == 3.0 and changed.config()["o2m_matcher_topk"] == 2
    with pytest.raises(ValueError, match="topk must be a whole number >= 1, got 0"):
        OneToManyMatcher(topk=0)


def test_numeric_settings_are_checked_before_caching():
    """A value that is not a number (``--matcher#cost_class abc`` failed at the first iteration with a traceback)
    or out of range (a negative ``grad_clip_norm`` flipped every gradient's sign) is refused naming its key."""
    from medsam3_monai.bundle import check_grad_clip_norm, check_setting_keys

    for good in (0, 0.1, 1):
        check_grad_clip_norm(good)
    for bad in (-1, "abc", None, True, float("nan")):
        with pytest.raises(ValueError, match="--grad_clip_norm must be a number >= 0"):
            check_grad_clip_norm(bad)
    check_setting_keys(matcher={"cost_class": 3}, o2m_matcher={"topk": 2, "threshold": 0.5}, loss_weights={"giou": 0})
    for setting, values, says in [("matcher", {"cost_class": "abc"}, "--matcher#cost_class must be a number >= 0"),
                                  ("matcher", {"cost_bbox": -1.0}, "--matcher#cost_bbox must be a number >= 0"),
                                  ("matcher", {"alpha": 2}, "--matcher: the Hungarian matcher's alpha must be a "
                                                            "number in \\[0, 1\\]"),
                                  ("o2m_matcher", {"threshold": 5}, "threshold must be a number in"),
                                  ("loss_weights", {"giou": "x"}, "--loss_weights#giou must be a number >= 0"),
                                  ("lr", {"detector": "abc"}, "--lr#detector must be a number >= 0"),
                                  ("lr", {"layer_decay": -1}, "--lr#layer_decay must be a number >= 0"),
                                  ("scheduler", {"warmup_steps": 2.5}, "warmup_steps must be a whole number"),
                                  ("scheduler", {"timescale": 0}, "--scheduler#timescale must be > 0"),
                                  ("training_dropout", {"dropout": "abc"}, "--training_dropout#dropout must be a num"),
                                  ("training_dropout", {"drop_path": 1}, "drop_path must lie in \\[0, 1\\)"),
                                  ("loss_settings", {"pos_weight": -5}, "--loss_settings#pos_weight must be a number"),
                                  ("loss_settings", {"mask_focal_alpha": 1.5}, "--loss_settings#mask_focal_alpha "
                                                                               "must be a number in \\[0, 1\\]"),
                                  ("loss_settings", {"normalization": "bogus"}, "--loss_settings#normalization must "
                                                                                "be global, local or none"),
                                  ("loss_settings", {"semantic": "maybe"}, "--loss_settings#semantic 'maybe': give "
                                                                           "true or false")]:
        with pytest.raises(ValueError, match=says):
            check_setting_keys(**{setting: values})
    check_setting_keys(lr={"detector": 0}, scheduler={"warmup_steps": 0, "timescale": 5.0},
                       loss_settings={"semantic": "false", "o2m_aux_matcher": "none", "soft_target_alpha": 0.5})
    for config in ("train.json", "multi_gpu_train.json"):
        assert "check_grad_clip_norm(@grad_clip_norm)" in (BUNDLE_CONFIGS / config).read_text()


def test_counts_and_switches_are_checked_before_caching(tmp_path):
    """``--max_instances -1`` dropped targets silently, ``--num_negatives -1`` and ``--slices_per_volume 0`` failed
    after caching, ``--dac maybe`` and a folder without config.json were refused only when the network was built."""
    from medsam3_monai.bundle import check_flags, check_network_source, require_positive, require_whole

    require_whole(max_instances=0, num_negatives=0, num_workers=2)  # 0: no cap, none, the main process
    for name, bad in (("max_instances", -1), ("num_negatives", 1.5), ("num_workers", "abc")):
        with pytest.raises(ValueError, match=f"--{name} must be a whole number >= 0, got {bad!r}"):
            require_whole(**{name: bad})
    with pytest.raises(ValueError, match="--slices_per_volume must be a whole number >= 1, got 0"):
        require_positive(slices_per_volume=0)
    check_flags(dac="false", bf16=True, compile="No")
    with pytest.raises(ValueError, match="--dac 'maybe': give true or false"):
        check_flags(dac="maybe")
    (tmp_path / "model.pt").write_bytes(b"")
    with pytest.raises(Exception, match=rf"{tmp_path} has no config.json: not a transformers checkpoint folder .*give "
                                        r"the file \(e.g. .*model.pt\)"):
        check_network_source(str(tmp_path), None)
    for config in ("train.json", "multi_gpu_train.json"):
        text = (BUNDLE_CONFIGS / config).read_text().split('"initialize"')[1]
        assert "slices_per_volume=@slices_per_volume)" in text
        assert ("require_whole(max_instances=@max_instances, num_negatives=@num_negatives, "
                "num_workers=@num_workers, seed=@seed)") in text
        assert "check_flags(bf16=@bf16, box_prompts=@box_prompts, compile=@compile, dac=@dac" in text


def test_a_checkpoint_of_another_image_size_and_bad_counts_are_refused_before_caching(tmp_path):
    """The training bundles' initialise step: a checkpoint's stored size against --image_size (was found after the
    data was cached), counts that must be >= 1, and the validation protocol."""
    from medsam3_monai.bundle import check_network_source, check_val_protocol, require_positive
    from medsam3_monai.networks import MedSAM3Net
    from medsam3_monai.networks.checkpoints import save_checkpoint_file

    model = save_checkpoint_file(MedSAM3Net("tiny", image_size=224).sam3, tmp_path / "model.pt")
    check_network_source(str(model), 224)
    check_network_source(str(model), None)
    with pytest.raises(ValueError, match="works at 224 px, not 112: give --image_size 224"):
        check_network_source(str(model), 112)
    with pytest.raises(ValueError, match="--max_epochs must be a whole number >= 1, got 0"):
        require_positive(max_epochs=0)
    with pytest.raises(ValueError, match="--val_protocol 'top-query': unknown protocol"):
        check_val_protocol("top-query")
    for config in ("train.json", "multi_gpu_train.json"):
        text = (BUNDLE_CONFIGS / config).read_text()
        assert "max_epochs=@max_epochs, batch_size=@batch_size" in text and "check_val_protocol(@val_protocol)" in text


def test_a_resize_kernel_the_transform_lacks_is_refused_by_every_bundle(tmp_path):
    """``resize_kernel`` (the slice-space resize: ``sam3``, the default, or ``monai``) is checked before anything
    is read, in one line: the real runner on the inference bundle."""
    from _bundle_helpers import assert_refused, run_bundle

    from medsam3_monai.bundle import check_resize_kernel

    for good in ("sam3", "monai"):
        check_resize_kernel(good)
    for config in ("train.json", "multi_gpu_train.json", "inference.json", "evaluate.json"):
        text = (BUNDLE_CONFIGS / config).read_text().split('"initialize"')[1]
        assert "check_resize_kernel(@resize_kernel)" in text, config
    result = run_bundle(["inference.json"], "--bundle_root", str(tmp_path / "run"), "--resize_kernel", "bicubic")
    assert_refused(result, "--resize_kernel 'bicubic': give 'sam3' (SAM3's image processor's resize")
    assert not (tmp_path / "run").exists()


def test_monai_finds_every_workflow_property_of_the_bundles(shared_data, tmp_path):
    """MONAI's own property check (``ConfigWorkflow.check_properties``, what MONAI Label and Deploy rely on to drive
    a bundle): nothing required is missing from train.json or inference.json, and MONAI's scan of the training
    handlers (for its ValidationHandler) can read every entry (a bare ``@reference`` there broke it); the evaluation
    overlay refers to its post-processing by MONAI's ``@postprocessing`` id."""
    from monai.bundle import ConfigWorkflow

    from medsam3_monai.data import build_datalist, write_datalist

    datalist = write_datalist(build_datalist("ChestXray_lung_sample", shared_data / "ChestXray_lung_sample").datalist,
                              tmp_path / "chest.json")
    meta = str(BUNDLE_CONFIGS / "metadata.json")
    picture = next((shared_data / "ChestXray_lung_sample").rglob("*.jpg"))
    workflows = {}
    for kind, configs, settings in (("train", ["train.json"], {"datalists": [str(datalist)]}),
                                    ("infer", ["inference.json"], {"datalist": str(picture), "prompts": ["lung"],
                                                                   "checkpoint": "tiny"}),
                                    ("eval", ["inference.json", "evaluate.json"], {"datalists": [str(datalist)],
                                                                                   "checkpoint": "tiny"})):
        files = [str(BUNDLE_CONFIGS / config) for config in configs]
        workflows[kind] = ConfigWorkflow(config_file=files, meta_file=meta, workflow_type=kind,
                                         bundle_root=str(tmp_path / kind), **settings)
        workflows[kind].initialize()
        assert workflows[kind].check_properties() == [], kind
    parser = workflows["train"].parser
    iteration = parser.get_parsed_content("trainer_iteration")  # one object: the handler and its readers'
    assert type(iteration).__name__ == "TrainerIteration"
    assert iteration is parser.get_parsed_content("train#handlers")[4]
    assert parser.get_parsed_content("best_model_saver").iteration is iteration


def test_a_log_line_during_an_epoch_gets_its_own_line_above_the_progress_bar(capsys):
    """The bundles' initialize routes console log handlers through tqdm: the bar is cleared before a log line
    (a skipped case, MONAI's "writing: ...") and drawn again after it, instead of the line continuing the bar's."""
    import logging
    import sys

    from tqdm import tqdm

    from medsam3_monai import bundle

    logger = logging.getLogger("medsam3_monai.tests.progress_bars")
    handler, logger.propagate = logging.StreamHandler(sys.stderr), False
    logger.addHandler(handler)
    try:
        bundle.log_above_progress_bars()
        bundle.log_above_progress_bars()  # idempotent
        assert isinstance(handler.stream, bundle._BarAwareStream) and handler.stream.stream is sys.stderr
        with tqdm(total=3, desc="evaluate", file=sys.stderr, ascii=True) as bar:
            bar.update(1)
            logger.warning("skipped an unreadable case")
        err = capsys.readouterr().err
        line = next(line for line in err.split("\n") if "skipped an unreadable case" in line)
        assert line.split("\r")[-1] == "skipped an unreadable case"  # the bar's text was cleared from its line
        assert "evaluate" in err.split("skipped an unreadable case")[1]  # and drawn again after it
    finally:
        logger.removeHandler(handler)


def test_a_bundle_driven_from_python_leaves_the_process_excepthook_alone(tmp_path):
    """``ConfigWorkflow.initialize()`` in a script runs the bundles' ``report_input_errors()``: the script's own
    ValueError later keeps its traceback and Python's status 1 (it was said as ``medsam3 bundle: error`` with
    status 2); ``python -m monai.bundle`` (tests/_bundle_helpers.py's runs) still ends input errors in one line."""
    import subprocess
    import sys

    script = tmp_path / "script.py"
    script.write_text(
        "import sys\nfrom medsam3_monai.bundle import report_input_errors\nbefore = sys.excepthook\n"
        "report_input_errors()\nassert sys.excepthook is before\nraise ValueError('my own bug')\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert done.returncode == 1 and "Traceback" in done.stderr and "medsam3 bundle" not in done.stderr, done.stderr
