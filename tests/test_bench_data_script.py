"""``scripts/bench_data.py --runs N``: the reports of N fresh processes combined into medians (hand-made reports, no
timing); the slowest set and the cores for 60 images/s come from those medians, not from any one run."""

from __future__ import annotations

import pytest
from _script_helpers import load_script


@pytest.fixture(scope="module")
def bench_data():
    return load_script("bench_data")


def _rates(rate: float) -> dict:
    return {"images": 5, "img_per_s": rate, "img_per_s_wall": rate - 1, "cpu_s": 5 / rate, "wall_s": 5 / (rate - 1)}


def _run(bench_data, rgb: tuple[float, float, float], grey: tuple[float, float, float], load: float) -> dict:
    """One process's report as ``main`` prints it: per set its cold, cold_again and cached rates."""
    sets = {name: {"dataset": name.upper(), "items": 5, **dict(zip(bench_data.KINDS, map(_rates, rates)))}
            for name, rates in (("rgb", rgb), ("grey", grey))}
    sets["rgb"]["cached"]["cache_fill_s"] = 1.0
    sets["grey"]["cached"]["cache_fill_s"] = 1.0
    report = {"image_size": 1008, "max_items_per_set": 16, "sets": sets}
    bench_data.summarize(report)
    report["machine"] = {"cpu_count": 2, "loadavg_1min": load, "bench_wall_s": 20.0}
    return report


def test_runs_are_combined_into_medians(bench_data):
    # rgb is the slowest cold set in runs 1 and 3, grey in run 2; by the medians rgb (16) is slower than grey (18)
    runs = [_run(bench_data, (16.0, 22.0, 400.0), (30.0, 31.0, 500.0), 0.5),
            _run(bench_data, (24.0, 20.0, 300.0), (18.0, 33.0, 450.0), 0.9),
            _run(bench_data, (15.0, 21.0, 350.0), (17.0, 29.0, 700.0), 0.7)]
    assert runs[1]["worst"]["cold"]["set"] == "grey"
    report = bench_data.median_of_runs(runs)
    assert report["runs"] == 3 and report["image_size"] == 1008
    rgb, grey = report["sets"]["rgb"], report["sets"]["grey"]
    assert rgb["cold"]["img_per_s"] == 16.0 and rgb["cold"]["runs"] == [16.0, 24.0, 15.0]
    assert rgb["cold"]["img_per_s_wall"] == 15.0 and rgb["cold"]["images"] == 5
    assert grey["cold"]["img_per_s"] == 18.0 and grey["cached"]["img_per_s"] == 500.0
    assert rgb["cached"]["cache_fill_s"] == 1.0 and rgb["dataset"] == "RGB"
    assert report["worst"]["cold"] == {"set": "rgb", "img_per_s": 16.0, "img_per_s_wall": 15.0}
    assert report["worst"]["cold_again"]["set"] == "rgb" and report["worst"]["cached"]["set"] == "rgb"
    assert report["cores_for_60_img_per_s"] == {"cold": 4, "cold_again": 3, "cached": 1}
    assert report["machine"]["loadavg_1min"] == [0.5, 0.9, 0.7] and report["machine"]["bench_wall_s"] == 60.0


def test_runs_below_one_are_refused(bench_data, capsys):
    with pytest.raises(SystemExit) as stop:
        bench_data.main(["--runs", "0"])
    assert stop.value.code == 2
    assert "--runs must be >= 1" in capsys.readouterr().err


def test_the_validation_benchmark_prints_its_json_alone_on_stdout(shared_data):
    """The training bundle logs to stdout (logging.conf); the benchmark's stdout must still parse as one JSON
    object, as every benchmark's does."""
    import json
    import subprocess
    import sys

    from _script_helpers import SCRIPTS

    done = subprocess.run([sys.executable, str(SCRIPTS / "bench_validation.py"), "--image-size", "112",
                           "--volumes", "1", "--threads", "1", "--data-root", str(shared_data)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["volumes"] == 1 and result["slices"] > 0 and "INFO" in done.stderr
