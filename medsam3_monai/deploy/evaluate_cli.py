"""``medsam3 evaluate``: evaluate one checkpoint (or compare two) on datalists and write the report.

One checkpoint -> ``OUT/{cases.csv, table.md, table.csv, radar.png, overlays/}`` (with ``--save-predictions`` also
``predictions/``) and an MLflow run in ``OUT/mlruns.db``. Two checkpoints -> the same report per checkpoint under
``OUT/<label>/`` plus ``OUT/comparison.{md,csv}`` (Δ = second − first), with an MLflow parent run holding the
comparison and one child run per checkpoint. Input errors (missing datalist, empty split, unreadable checkpoint, OUT not empty)
are reported before anything is written; a failure later removes what was written (no partial OUT).

``--prompt-variants synonyms``: one report per phrasing run (``OUT/canonical``, ``OUT/phrasing-K``,
``OUT/ensemble``) and the robustness table ``OUT/robustness.{md,csv,png}`` (+ ``robustness_summary.csv``,
``phrasings.json``); see ``metrics.robustness`` and ``bundles/medsam3/docs/robustness.md``.
``--agent``: the plain evaluation (``OUT/plain``) and the MedSAM3 agent's (``OUT/agent``, with ``traces/`` and
``agent_cases.csv``) side by side in ``OUT/comparison.{md,csv}`` (Δ = agent − plain).
In both, the runs are child MLflow runs of one parent that holds the combined table.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any

from ..data.selection import (
    SPLIT_CHOICES,  # light (the data package imports its submodules on first use)
)
from ..protocol_registry import DEFAULT_PROTOCOL, PROTOCOLS
from .agent_cli import add_planner_options
from .arguments import (add_ct_window_option, add_detector_chunk_option, add_gpu_options, add_resize_kernel_option,
                        add_score_threshold_option, add_tracker_batch_option, at_least, compile_notice,
                        gpu_context, remove_output)

__all__ = ["add_parser", "checkpoint_labels", "run"]

_EPILOG = """\
split: 'auto' (default) takes each datalist's test list when it has one, else its validation list
(several datasets have no official test split); --max-cases N keeps a seeded sample of N cases of each
datalist (--seed).
Protocols (2D): """ + "; ".join(f"{p.name} = {p.describe('--score-threshold')}" for p in PROTOCOLS.values()) + """.
--box-prompts adds the box of the ground truth's largest connected component (T+I). Volumes: detector on every
slice (top query, score >= --volume-score-threshold, default --score-threshold) merged with SAM3 tracker
propagation from the most confident slice (--tracker).
Metrics are computed in each input's own geometry; NSD (2 mm) and HD95 where the spacing is known.
--prompt-variants synonyms: every dataset with its datalist prompt, each catalogue phrasing of its concepts
(synonyms.json, the papers' prompts) and their ensemble (the offline agent planner's confidence fusion, one
batch) -> OUT/robustness.md/.csv/.png (Dice per phrasing, worst case, spread). Guide:
bundles/medsam3/docs/robustness.md
--agent: the MedSAM3 agent answers "Segment the <concept> in this <image>." per class (--llm-url/--llm-model: an
OpenAI-compatible MLLM; --llm none or no endpoint: the offline planner) -> plain vs agent Dice side by side
(OUT/comparison.md, Δ = agent − plain) and every trace (OUT/agent/traces, MLflow artifacts). Keys come only from
the environment (--api-key-env VAR). Guide: bundles/medsam3/docs/agent.md
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "evaluate",
        help="evaluate a checkpoint (or compare two) on datalists: CSV, tables, radar chart, overlays, MLflow",
        description="Per-case and per-dataset Dice / IoU (NSD / HD95 with known spacing) of text-prompted "
                    "segmentation, as in Medical SAM3 Table 3.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--datalist", action="append", required=True, metavar="FILE",
                        help="datalist JSON (repeat for several datasets)")
    parser.add_argument("--checkpoint", action="append", required=True, metavar="SRC",
                        help="'tiny', an HF folder, sam3.pt, a Medical-SAM3 or medsam3-monai checkpoint; "
                             "give it twice to compare two checkpoints")
    parser.add_argument("--out", required=True, metavar="DIR", help="report folder (must not exist or be empty)")
    parser.add_argument("--split", choices=SPLIT_CHOICES, default="auto",
                        help="cases to evaluate (default auto: test if present, else validation)")
    parser.add_argument("--protocol", choices=list(PROTOCOLS), default=DEFAULT_PROTOCOL,
                        help=f"2D protocol ({DEFAULT_PROTOCOL})")
    add_score_threshold_option(parser, default=None, also=" unless --volume-score-threshold gives that; refused "
                                                          "where nothing would read it")
    parser.add_argument("--volume-score-threshold", type=float, default=None, metavar="T",
                        help="the volumes' detection threshold (default: --score-threshold), e.g. 0.5 beside "
                             "--protocol top_query_floor --score-threshold 0.1: the release's rules for a mix of "
                             "pictures and volumes in one run")
    parser.add_argument("--box-prompts", action="store_true",
                        help="text + box prompts: the ground truth's largest component box (2D images)")
    parser.add_argument("--image-size", type=int, default=None, metavar="N",
                        help="slice-space size: tiny 112 by default; a checkpoint file without a configuration "
                             "(sam3.pt, a Medical-SAM3 file) is built at it (default 1008; 504 for the release's 3D "
                             "checkpoint); others must match theirs")
    add_resize_kernel_option(parser)
    add_ct_window_option(parser)
    parser.add_argument("--max-cases", type=int, default=None, metavar="N",
                        help="at most N cases per datalist: a seeded sample (--seed), kept in file order")
    parser.add_argument("--seed", type=int, default=42, help="seed of the --max-cases sample (42)")
    parser.add_argument("--tracker", default="auto", metavar="SRC",
                        help="3D tracker: auto (tiny for tiny, the checkpoint's for a facebook/sam3 folder or "
                             "a sam3.pt, else none), none, tiny, an HF folder or a sam3.pt")
    parser.add_argument("--overlays", type=at_least(0), default=8, metavar="N",
                        help="overlay images to draw (8; 0: none)")
    parser.add_argument("--save-predictions", action="store_true",
                        help="also write every case's label map in its input's geometry: "
                             "OUT/predictions/<dataset>/<case>_seg.png (2D, the prompts' label values: 1 for a "
                             "binary mask's foreground) or .nii.gz "
                             "(volumes, the input's affine)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default sqlite:///OUT/mlruns.db, artifacts in OUT/mlartifacts)")
    parser.add_argument("--experiment", default=None, help="MLflow experiment name (medsam3-evaluate)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log an MLflow run")
    parser.add_argument("--skip-unreadable", action="store_true",
                        help="skip cases whose image or mask is missing or cannot be read (listed in OUT/skipped.csv "
                             "and counted at the end) instead of stopping at the first one")
    parser.add_argument("--skip-empty-truth", action="store_true",
                        help="leave 2D (case, prompt) rows whose truth is empty out of the tables (listed in "
                             "OUT/skipped_empty_truth.csv), as the Medical-SAM3 release's 2D evaluation does; volume "
                             "rows are all scored; by default they score 100 when the prediction is empty too, else 0")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--num-workers", type=at_least(0), default=0, metavar="N", help="data loader workers (0)")
    parser.add_argument("--batch-size", type=at_least(1), default=1, metavar="N",
                        help="cases per loader batch: their 2D images go through the network together, several per "
                             "forward, as `medsam3 segment` does (1; 8 or more keeps a GPU busy). A batched forward "
                             "rounds differently: a pixel whose logit is within rounding of 0 may flip")
    add_detector_chunk_option(parser)
    add_tracker_batch_option(parser)
    add_gpu_options(parser)

    variants = parser.add_argument_group("prompt robustness")
    variants.add_argument("--prompt-variants", choices=("synonyms",), default=None,
                          help="synonyms: score the datalist prompt, each catalogue phrasing of every concept and "
                               "their ensemble; writes OUT/robustness.{md,csv,png}")
    variants.add_argument("--max-phrasings", type=int, default=None, metavar="N",
                          help="phrasings per concept (default: all the catalogue has; the agent's offline "
                               "planner: 6)")
    variants.add_argument("--keep-ratio", type=float, default=None, metavar="F",
                          help="ensemble / offline planner: phrasings scoring >= F x the best one add their pixels "
                               "(0.5)")

    agent = parser.add_argument_group("agent evaluation (--agent)")
    agent.add_argument("--agent", action="store_true",
                       help="also evaluate the MedSAM3 agent on the same cases: plain vs agent side by side")
    agent.add_argument("--agent-request", default=None, metavar="TEMPLATE",
                       help="the request per class, with {concept}, {image}, {modality}, {dataset} (default "
                            "'Segment the {concept} in this {image}.')")
    add_planner_options(agent)
    agent.add_argument("--max-rounds", type=int, default=3, metavar="N", help="segment_phrase calls per request (3)")
    agent.add_argument("--max-tokens", type=int, default=200_000, metavar="N",
                       help="token budget of each agent request (one class of one case; 200000)")
    agent.add_argument("--llm-timeout", type=float, default=120.0, metavar="S", help="seconds per HTTP attempt (120)")
    agent.add_argument("--llm-retries", type=int, default=2, metavar="N", help="retries after time-outs, 429, 5xx (2)")
    agent.add_argument("--tool-mode", choices=("auto", "tools", "text"), default="auto",
                       help="native function calling, or JSON in the reply text (auto: when tools are refused)")
    agent.add_argument("--no-fallback", action="store_true",
                       help="fail instead of falling back to the offline planner when the endpoint is unreachable")
    agent.add_argument("--agent-on-error", choices=("fail", "empty"), default="fail",
                       help="a failed agent run (time-out, HTTP error, budget): stop (fail, default) or score that "
                            "class with an empty mask (empty; listed in agent_cases.csv)")
    parser.set_defaults(func=run)
    return parser


# ------------------------------------------------------------------------------------------------ pieces
def _label_text(text: str) -> str:
    """``text`` with only the characters folder names and MLflow run names take (others become ``_``)."""
    return re.sub(r"[^0-9A-Za-z._-]+", "_", text) or "checkpoint"


def checkpoint_labels(sources: list[str]) -> list[str]:
    """Short distinct names for report folders, table headers and MLflow run names ('tiny', a file's stem, a
    folder's name; a bundle's ``models/model.pt`` is named after the bundle folder; two of one name get the
    folder where their paths part as a prefix, or ``-1`` / ``-2``)."""
    names = [_label_text(_checkpoint_name(source)) for source in sources]
    if len(set(names)) < len(names) and "tiny" in sources:
        # the preset and a file of the same name (the tiny recipe's ~/medsam3-runs/tiny/models/model.pt): the
        # preset keeps 'tiny', the file takes its folder's name too (tiny-model)
        names = [n if source == "tiny" else _label_text(_checkpoint_name(source, qualified=True))
                 for source, n in zip(sources, names)]
    elif len(set(names)) < len(names):
        # the same name in two places (runA/checkpoints/model_best_val_dice.pt, runB/...): the first folder in which
        # their paths part, e.g. runA-model_best_val_dice
        paths = [Path(source).resolve().parts for source in sources]
        common = len(os.path.commonprefix(paths))
        names = [f"{_label_text(parts[common])}-{n}" if len(parts) > common + 1 else n
                 for parts, n in zip(paths, names)]
    if len(set(names)) < len(names):
        names = [f"{n}-{i + 1}" for i, n in enumerate(names)]
    return names


def _checkpoint_name(source: str, qualified: bool = False) -> str:
    """'tiny', a bundle's name for its ``models/model.pt`` (``qualified``: ``<bundle>-model``), a file's stem or a
    folder's name (``qualified``: after its parent folder's, ``<parent>-<name>``)."""
    path = Path(source)
    if source == "tiny":
        return source
    if path.name == "model.pt" and path.parent.name == "models":  # a bundle's weights: the bundle's name
        bundle = path.parent.parent.resolve().name
        return f"{bundle}-model" if qualified else bundle
    name = path.stem if path.is_file() else path.name
    return f"{path.resolve().parent.name}-{name}" if qualified else name


# ------------------------------------------------------------------------------------------------ command
def _check_2d_options(items: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """``--protocol`` (other than the default) and ``--box-prompts`` act on 2D pictures; volumes take the detector's
    top query. Refused before anything runs: when every case is a volume, and when a dataset holds pictures and
    volumes (its mean would mix two protocols)."""
    from ..data.selection import is_volume_item

    option = (f"--protocol {args.protocol}" if args.protocol != DEFAULT_PROTOCOL
              else "--box-prompts" if args.box_prompts else None)
    if option is None:
        return
    volume = [is_volume_item(item) for item in items]
    if all(volume):
        raise ValueError(f"{option} acts on 2D cases, and every case of this run is a volume (segmented by the "
                         "detector's top query on each slice and the tracker, as medsam3 segment does): leave it out")
    pictures = {str(item["dataset"]) for item, is_volume in zip(items, volume) if not is_volume}
    both = sorted(pictures & {str(item["dataset"]) for item, is_volume in zip(items, volume) if is_volume})
    if both:
        raise ValueError(f"dataset(s) {', '.join(both)} hold 2D pictures and volumes: with {option} the pictures run "
                         "that protocol and the volumes the detector's top query, and a dataset's mean takes one "
                         "protocol; give the volumes' items another 'dataset' name, or leave out " + option)


def keep_ratio(args: argparse.Namespace) -> float:
    """``--keep-ratio`` as given, else its default (0.5): the ensemble's and the offline planner's."""
    return 0.5 if args.keep_ratio is None else float(args.keep_ratio)


def _check_studies(args: argparse.Namespace, sources: list[str]) -> None:
    """Option combinations that cannot run, before anything is read."""
    if len(sources) > 2:
        raise ValueError(f"--checkpoint given {len(sources)} times; evaluate one checkpoint or compare two")
    if args.prompt_variants and args.agent:
        raise ValueError("--prompt-variants and --agent are two studies: run them one at a time")
    study = "--prompt-variants" if args.prompt_variants else "--agent" if args.agent else None
    if study and len(sources) > 1:
        raise ValueError(f"{study} evaluates one checkpoint: give --checkpoint once")
    if args.agent and args.box_prompts:
        raise ValueError("--agent answers text requests: leave out --box-prompts")
    # options of a study that would change nothing without it
    unused = [option for option, given in (("--max-phrasings", args.max_phrasings is not None),
                                           ("--keep-ratio", args.keep_ratio is not None)) if given and not study]
    unused += ["--agent-request"] if args.agent_request is not None and not args.agent else []
    if unused:
        raise ValueError(f"{' and '.join(unused)} would change nothing here: "
                         + ("--agent-request is the agent's (give --agent)" if unused == ["--agent-request"] else
                            "they belong to --prompt-variants synonyms (the ensemble) and --agent (the offline "
                            "planner)"))
    if args.max_phrasings is not None and args.max_phrasings < 1:
        raise ValueError(f"--max-phrasings must be at least 1, got {args.max_phrasings}")
    if not 0.0 <= keep_ratio(args) <= 1.0:
        raise ValueError(f"--keep-ratio must be in [0, 1], got {args.keep_ratio}")
    for option, value in (("--score-threshold", args.score_threshold),
                          ("--volume-score-threshold", args.volume_score_threshold)):
        if value is not None and not 0.0 <= value <= 1.0:
            raise ValueError(f"{option} must be in [0, 1], got {value}")
    if len(sources) == 2 and (sources[0] == sources[1] or (
            sources[0] != "tiny" and Path(sources[0]).resolve() == Path(sources[1]).resolve())):
        print(f"medsam3 evaluate: note: both --checkpoint give {sources[0]}: the comparison is of a network with "
              "itself (every Δ is 0)", file=sys.stderr)


def agent_settings(args: argparse.Namespace) -> Any:
    """The agent's planner settings from the command line (endpoint, model and key variable checked here, before
    anything is loaded: nothing is built in, keys come only from the environment)."""
    from ..agent.loop import LoopSettings
    from ..agent.runner import AgentSettings, check_llm_limits, check_planner

    settings = AgentSettings(
        llm=args.llm, llm_url=args.llm_url, llm_model=args.llm_model, api_key_env=args.api_key_env,
        timeout=args.llm_timeout, retries=args.llm_retries, fallback=not args.no_fallback,
        max_phrasings=args.max_phrasings or 6, keep_ratio=keep_ratio(args),
        loop=LoopSettings(max_rounds=args.max_rounds, max_tokens=args.max_tokens, tool_mode=args.tool_mode),
    )
    check_llm_limits(settings.timeout, settings.retries)
    check_planner(settings)
    return settings


def run(args: argparse.Namespace) -> int:
    from ..engines.evaluation import (
        DEFAULT_AGENT_REQUEST,
        evaluation_items,
        is_volume_item,
        check_volume_score_threshold,
        run_evaluation,
    )
    from .arguments import check_writable, checked_threshold_option, ct_window_for
    from ..engines.reports import check_tracking_uri, default_tracking_uri, open_experiment
    from ..networks import load_network
    from ..networks.tracker import resolve_tracker
    from ..tensors import resolve_device

    sources = list(args.checkpoint)
    _check_studies(args, sources)
    template = args.agent_request or DEFAULT_AGENT_REQUEST
    settings = agent_settings(args) if args.agent else None
    if args.agent:
        from ..engines.evaluation import agent_request

        agent_request("x", template=template)
    # with --skip-unreadable a missing file is one more unreadable case, listed in the report
    items = evaluation_items(args.datalist, args.split, args.max_cases, seed=args.seed,
                             check_files=not args.skip_unreadable)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"output {out} exists and is not an empty folder; choose a new --out")
    check_writable(out, "--out", folder=True)  # before the networks load
    plan = None
    if args.prompt_variants:
        from ..metrics.robustness import plan_phrasings

        plan = plan_phrasings(items, args.max_phrasings)
    _check_2d_options(items, args)
    window = ct_window_for(args.ct_window, [item.get("modality") for item in items])
    if not args.no_mlflow:
        check_tracking_uri(args.tracking_uri, experiment=args.experiment)
    volumes = sum(is_volume_item(item) for item in items)
    check_volume_score_threshold(args.volume_score_threshold, items, "--volume-score-threshold")
    # an unread --score-threshold (the pictures' protocol reads none, and the volumes have their own) is refused
    args.score_threshold = checked_threshold_option(args.score_threshold, [args.protocol],
                                                    bool(volumes) and args.volume_score_threshold is None)
    networks = [load_network(source, args.image_size, detector_chunk=args.detector_chunk) for source in sources]
    trackers = [resolve_tracker(args.tracker, s, n, described=True) if volumes else (None, "none")
                for s, n in zip(sources, networks)]
    device = resolve_device(args.device)
    if args.compile:
        from ..inferers.batch import compile_network

        for network, (tracker, _) in zip(networks, trackers):
            # batches padded to the first one's size (a volume's slice batches may differ); the tracker's per-slice
            # modules too; the toolchain checked for the device it will run on (it is moved there later)
            compile_network(network, compile=True, pad_batches=True, tracker=tracker, device=device)
        print(compile_notice("medsam3 evaluate"), file=sys.stderr)
    labels = checkpoint_labels(sources)
    runs = _runs(args, items, labels, plan, settings, template, out)

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        tracking_uri, client, parent = args.tracking_uri, None, None
        if len(runs) > 1 and not args.no_mlflow:
            tracking_uri = tracking_uri or default_tracking_uri(out)
            client, experiment_id = open_experiment(tracking_uri, args.experiment or "medsam3-evaluate",
                                                    out / "mlartifacts" if args.tracking_uri is None else None)
            name = (f"{labels[1]} vs {labels[0]}" if len(sources) == 2 else
                    f"{labels[0]}: prompt robustness" if plan is not None else f"{labels[0]}: plain vs agent")
            parent = client.create_run(experiment_id, run_name=name).info.run_id
            if plan is not None or args.agent:
                _log_params(client, parent, args, sources[0])
            elif len(sources) == 2:  # which two were compared, on the run holding the deltas
                second = sources[1] if sources[1] == "tiny" else str(Path(sources[1]).expanduser().resolve())
                _log_params(client, parent, args, sources[0], {"checkpoint_b": second, "label_a": labels[0],
                                                               "label_b": labels[1]})
        reports = {}
        for spec in runs:
            index = spec.get("network", 0)
            network, (tracker, tracker_name) = networks[index], trackers[index]
            evaluation = _with_numerics(spec.get("evaluation", {}), args)
            with gpu_context(args, device):
                report = run_evaluation(
                    network, spec["items"], out if len(runs) == 1 else out / spec["label"], checkpoint=sources[index],
                    datalists=[Path(p).resolve() for p in args.datalist], split=args.split, max_cases=args.max_cases,
                    protocol=args.protocol, score_threshold=args.score_threshold, box_prompts=args.box_prompts,
                    tracker=tracker, tracker_name=tracker_name, device=device,
                    max_overlays=spec.get("overlays", args.overlays), progress=not args.no_progress,
                    num_workers=args.num_workers, batch_size=args.batch_size, mlflow=not args.no_mlflow,
                    tracking_uri=tracking_uri,
                    experiment=args.experiment, run_name=spec["label"], parent_run_id=parent,
                    skip_unreadable=args.skip_unreadable, tracker_batch=args.tracker_batch,
                    skip_empty_truth=args.skip_empty_truth, volume_score_threshold=args.volume_score_threshold,
                    save_predictions=args.save_predictions, resize_kernel=args.resize_kernel, ct_window=window,
                    **evaluation,
                )
            if len(sources) == 2:
                network.to("cpu")
                if tracker is not None:
                    tracker.to("cpu")
            reports[spec["label"]] = report
            if report.unreadable:
                print(f"medsam3 evaluate: skipped {len(report.unreadable)} unreadable case(s) of "
                      f"{len(spec['items'])}; listed in {report.out_dir / 'skipped.csv'}", file=sys.stderr)
            if plan is None:
                print(f"== {spec['label']} ({sources[index]})\n{(report.out_dir / 'table.md').read_text()}")
        if len(sources) == 2:
            _write_comparison(list(reports.values()), labels, out, client, parent,
                              note=_tracker_note(labels, [name for _, name in trackers]), sources=sources)
        elif args.agent:
            recorder = runs[1]["evaluation"]["inferer"]["recorder"]
            table = recorder.write_csv(out / "agent" / "agent_cases.csv", reports["agent"].records)
            if client is not None and reports["agent"].run_id:
                client.log_artifact(reports["agent"].run_id, str(table))
            failed = [row for row in recorder.rows if row["status"] == "failed"]
            if failed:  # --agent-on-error empty: said here, not only in agent_cases.csv
                print(f"medsam3 evaluate: WARNING: {len(failed)} of {len(recorder.rows)} agent request(s) failed and "
                      f"were scored as empty masks (--agent-on-error empty; a case without the structure then "
                      f"scores Dice 1); first: {failed[0]['dataset']} case {failed[0]['case']}: {failed[0]['reason']}"
                      "; every reason is in agent/agent_cases.csv", file=sys.stderr)
            _write_comparison([reports["plain"], reports["agent"]], ["plain", "agent"], out, client, parent,
                              note=_agent_note(settings, template, recorder))
        elif plan is not None:
            _write_robustness(plan, reports, out, client, parent, sources[0], args)
    except BaseException:
        if parent is not None:  # an external tracking store keeps the run: mark it failed
            try:
                client.set_terminated(parent, status="FAILED")
            except Exception:  # noqa: BLE001 - the original error matters more
                pass
        remove_output(out, created)
        raise
    where = f"; MLflow: {tracking_uri or default_tracking_uri(out)}" if not args.no_mlflow else ""
    print(f"medsam3 evaluate: reports in {out}{where}", file=sys.stderr)
    return 0


def _runs(args: argparse.Namespace, items: list[dict[str, Any]], labels: list[str], plan: Any, settings: Any,
          template: str, out: Path) -> list[dict[str, Any]]:
    """The evaluation runs of this command: label, items, network index, overlays and ``run_evaluation``
    extras (the case inferer, notes, parameters, artifact folders)."""
    if plan is not None:
        from ..metrics.robustness import ENSEMBLE

        runs = []
        for variant in plan.variants():
            variant_items = plan.items_for(items, variant)
            if not variant_items:
                continue
            evaluation: dict[str, Any] = {"params": {"prompt_variant": variant}}
            if variant == ENSEMBLE:
                evaluation["inferer"] = {"_target_": "medsam3_monai.engines.evaluation.EnsembleCaseInferer",
                                         "keep_ratio": keep_ratio(args)}
                evaluation["notes"] = [f"Prompt variant `ensemble`: every phrasing of each class in one batch, fused "
                                       f"by confidence (kept: score >= {keep_ratio(args):g} x the class's best); the "
                                       "table names each class by its canonical prompt."]
            else:
                evaluation["notes"] = [f"Prompt variant `{variant}`: each class prompted with its phrasing "
                                       f"{plan.index(variant)} (see ../phrasings.json); a class with fewer phrasings "
                                       "keeps its datalist prompt and is left out of the robustness table for this "
                                       "run."] if variant != "canonical" else []
            runs.append({"label": variant, "items": variant_items, "evaluation": evaluation,
                         "overlays": args.overlays if variant in ("canonical", ENSEMBLE) else 0})
        return runs
    if args.agent:
        from ..agent.runner import planner_name
        from ..engines.evaluation import AgentRecorder, agent_evaluation

        recorder = AgentRecorder(out / "agent" / "traces", on_error=args.agent_on_error)
        agent_items, inferer = agent_evaluation(items, settings, recorder, template)
        notes = [f"Agent: planner {planner_name(settings)}; request per class {template!r}; the union of the marks "
                 "the planner selects (report_no_mask: an empty mask); overlaps to the higher-scoring answer. "
                 "Traces in traces/, one row per request in agent_cases.csv."]
        return [{"label": "plain", "items": items},
                {"label": "agent", "items": agent_items, "evaluation": {
                    "inferer": inferer, "notes": notes, "artifact_dirs": ("overlays", "traces"),
                    "params": {"planner": planner_name(settings), "request_template": template}}}]
    return [{"label": label, "items": items, "network": i} for i, label in enumerate(labels)]


def _agent_note(settings: Any, template: str, recorder: Any) -> str:
    from ..agent.runner import planner_name

    statuses: dict[str, int] = {}
    for row in recorder.rows:
        statuses[row["status"]] = statuses.get(row["status"], 0) + 1
    counted = ", ".join(f"{n} {status}" for status, n in sorted(statuses.items()))
    planners = sorted({str(row.get("planner")) for row in recorder.rows})
    failed = statuses.get("failed", 0)
    warning = (f" **{failed} failed request{'s' * (failed != 1)} scored as empty masks** (--agent-on-error empty: "
               "a case without the structure then scores Dice 1)." if failed else "")
    return (f"Agent: planner {planner_name(settings)} (ran as: {', '.join(planners)}); request {template!r}; "
            f"{len(recorder.rows)} request{'s' * (len(recorder.rows) != 1)} ({counted}); traces in agent/traces, per "
            f"request agent/agent_cases.csv.{warning}")


def _with_numerics(evaluation: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """``run_evaluation``'s extras plus how the network ran: MLflow parameters ``autocast`` and ``compiled`` (what
    ``medsam3 segment``'s sidecars record, :func:`~.segment_cli.numerics`) and, under bf16 autocast, a note under the
    table."""
    from .segment_cli import numerics

    evaluation = dict(evaluation)
    ran = numerics(args)
    evaluation["params"] = {**evaluation.get("params", {}), **ran}
    autocast = ran["autocast"]
    if autocast != "none":
        evaluation["notes"] = [*evaluation.get("notes", []),
                               f"The network ran under {autocast} autocast (`--autocast {autocast}`): scores carry "
                               "about three significant digits and masks can differ from a float32 run at their edges."]
    return evaluation


def _log_params(client: Any, run_id: str, args: argparse.Namespace, checkpoint: str,
                extra: dict[str, Any] | None = None) -> None:
    """The parent run's parameters: what was evaluated and how (``extra``: more, e.g. a comparison's second
    checkpoint)."""
    from mlflow.entities import Param

    from .segment_cli import numerics

    values = {"checkpoint": checkpoint, "protocol": args.protocol, "score_threshold": args.score_threshold,
              "volume_score_threshold": args.volume_score_threshold,  # (None: not logged)
              "skip_empty_truth": args.skip_empty_truth,
              "split": args.split, "max_cases": args.max_cases,
              "datalists": ",".join(str(Path(p).resolve()) for p in args.datalist),
              **numerics(args), **(extra or {})}
    if args.prompt_variants:
        values.update(prompt_variants=args.prompt_variants, max_phrasings=args.max_phrasings,
                      keep_ratio=keep_ratio(args))
    if args.agent:
        values.update(llm=args.llm, llm_url=args.llm_url, llm_model=args.llm_model, api_key_env=args.api_key_env,
                      max_rounds=args.max_rounds, agent_request=args.agent_request or "default")
    client.log_batch(run_id, params=[Param(k, str(v)[:500]) for k, v in values.items() if v is not None])


def _write_robustness(plan: Any, reports: dict[str, Any], out: Path, client: Any, parent: str | None,
                      checkpoint: str, args: argparse.Namespace) -> None:
    import json

    from ..metrics.robustness import robustness_plot, robustness_table

    table = robustness_table({variant: report.records for variant, report in reports.items()}, plan)
    files = [table.to_csv(out / "robustness.csv"), table.summary_to_csv(out / "robustness_summary.csv")]
    (out / "phrasings.json").write_text(json.dumps(plan.as_json(), indent=2) + "\n", encoding="utf-8")
    files.append(out / "phrasings.json")
    title = f"Prompt robustness: Dice per phrasing (checkpoint `{checkpoint}`, protocol {table.protocol})"
    notes = [
        "Runs: `canonical` = each class's datalist prompt (a plain `medsam3 evaluate`); `phrasing-K` = every class "
        "prompted with its K-th catalogue phrasing (phrasings.json: the canonical concept, the dataset's paper "
        "prompts, synonyms.json); `ensemble` = all phrasings of a class in one batch, fused by confidence as the "
        f"offline agent planner fuses them (kept: score >= {keep_ratio(args):g} x the best).",
        "Worst / best / spread (best − worst, percentage points) / mean are over the single phrasings; Δ and "
        "'Ensemble − canonical' against the datalist prompt. Each run's own report is in OUT/<run>/.",
        _rows_line(reports.get("canonical", next(iter(reports.values()))).records, args),
    ]
    if all(record.get("empty_prediction", False) for report in reports.values() for record in report.records):
        notes.insert(0, "WARNING: every prediction of every run is empty, so every number here compares nothing: "
                        "the protocol gave no mask a foreground pixel (each run's table.md says what to change, e.g. "
                        "--protocol semantic for a model trained with the semantic head alone).")
    single = [f"{s['concept']} ({s['dataset']})" for s in table.summary
              if s["dataset"] != "overall" and not s["varied"]]
    if single:
        notes.append(f"One phrasing only (the catalogue has no other wording), nothing varied: {', '.join(single)}; "
                     "no worst, spread or mean for them, and the overall row leaves them out (add wordings to "
                     "datasets_meta/synonyms.json).")
        print(f"medsam3 evaluate: note: {notes[-1]}", file=sys.stderr)
    (out / "robustness.md").write_text(table.to_markdown(title, notes), encoding="utf-8")
    files.append(out / "robustness.md")
    files.append(robustness_plot(table, out / "robustness.png"))
    print(f"== prompt robustness\n{(out / 'robustness.md').read_text()}")
    if client is None:
        return
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(parent, metrics=[Metric(k, v, now, 0) for k, v in table.metrics().items()])
    for path in files:
        client.log_artifact(parent, str(path))
    client.set_terminated(parent)


def _rows_line(records: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """The robustness notes' line on what each run scores: its cases and (case, class) rows."""
    cases = len({(record.get("dataset"), record.get("case")) for record in records})
    return (f"Each run scores {cases} case{'s' * (cases != 1)} ({len(records)} (case, class) "
            f"row{'s' * (len(records) != 1)}); split `{args.split}`"
            + (f", --max-cases {args.max_cases} per datalist" if args.max_cases else "") + ".")


def _tracker_note(labels: list[str], trackers: list[str]) -> str | None:
    """The comparison's note when the two checkpoints' volumes ran with different trackers (``--tracker auto``: the
    tiny one for ``tiny``, none for a checkpoint without tracker weights), or None."""
    if trackers[0] == trackers[1]:
        return None
    return (f"Volumes ran with different trackers ({labels[0]}: {trackers[0]}; {labels[1]}: {trackers[1]}), so a "
            "volume dataset's Δ compares two pipelines, not only two checkpoints: give --tracker to use one for both")


def _write_comparison(reports: list[Any], labels: list[str], out: Path, client: Any, parent: str | None,
                      note: str | None = None, sources: list[str] | None = None) -> None:
    from ..metrics.aggregate import compare

    comparison = compare(reports[0].table, reports[1].table, labels=(labels[0], labels[1]))
    if note:
        comparison.notes.append(note)
    if sources:
        comparison.notes.append("Checkpoints: " + "; ".join(f"{label} = `{source}`"
                                                            for label, source in zip(labels, sources)))
    comparison.to_csv(out / "comparison.csv")
    title = f"{labels[1]} vs {labels[0]} (Δ = {labels[1]} − {labels[0]}; protocol {reports[0].table.protocol})"
    (out / "comparison.md").write_text(comparison.to_markdown(title=title), encoding="utf-8")
    print(f"== comparison\n{(out / 'comparison.md').read_text()}")
    if client is None:
        return
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = []
    for row in comparison.rows:
        prefix = {"dataset": row["name"], "group": f"group/{row['name']}", "overall": "overall"}[row["kind"]]
        for metric in comparison.metrics:
            value = row[f"{metric}_delta"]
            if value == value:
                key = re.sub(r"[^0-9A-Za-z_\-. :/]+", "_", f"{prefix}/{metric}_delta")
                metrics.append(Metric(key, float(value), now, 0))
    client.log_batch(parent, metrics=metrics)
    for name in ("comparison.csv", "comparison.md"):
        client.log_artifact(parent, str(out / name))
    client.set_terminated(parent)
