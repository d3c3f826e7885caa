"""Benchmarks of issue 6: statistics, exact cropped metrics, report/README generation, and a smoke
run of each benchmark script with its tiny configuration (writing to tmp dirs only)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import efficacy  # noqa: E402
import performance  # noqa: E402
import report  # noqa: E402
from _measure import BenchmarkError  # noqa: E402


# ---------------------------------------------------------------------------------------------
# Statistics


def test_gap_recovery_arithmetic_and_guards():
    assert efficacy.gap_recovery(0.6, 0.4, 0.8) == pytest.approx(0.5)
    assert efficacy.gap_recovery(0.3, 0.4, 0.8) == pytest.approx(-0.25)  # worse than plain: negative
    assert efficacy.gap_recovery(0.5, 0.4, 0.4) is None  # no gap
    assert efficacy.gap_recovery(0.5, 0.6, 0.4) is None  # teacher worse than the plain student
    assert efficacy.gap_recovery(None, 0.4, 0.8) is None


def _run(method, seed, dice):
    return {"method": method, "seed": seed, "mean_dice": dice, "mean_hd95": 10.0, "train_seconds": 5.0}


def test_summarize_per_seed_and_of_means():
    runs = [_run("none", 0, 0.2), _run("none", 1, 0.4), _run("recokd", 0, 0.5), _run("recokd", 1, 0.4)]
    s = efficacy.summarize(runs, teacher_dice=0.8, methods=["none", "recokd"])
    # per seed: (0.5-0.2)/(0.8-0.2) = 0.5 and (0.4-0.4)/(0.8-0.4) = 0
    assert s["recokd"]["gap_recovery_per_seed"]["mean"] == pytest.approx(0.25)
    assert s["recokd"]["gap_recovery_per_seed"]["sd"] == pytest.approx(np.std([0.5, 0.0], ddof=1))
    # of means: (0.45 - 0.3) / (0.8 - 0.3)
    assert s["recokd"]["gap_recovery_of_means"] == pytest.approx(0.3)
    assert s["recokd"]["mean_dice"] == pytest.approx(0.45)
    assert s["recokd"]["delta_dice_vs_plain"] == pytest.approx(0.15)
    assert s["none"]["gap_recovery_of_means"] is None and s["none"]["gap_recovery_per_seed"]["n"] == 0
    one = efficacy.summarize([_run("none", 0, 0.2)], 0.8, ["none", "recokd"])
    assert one["none"]["sd_dice"] is None and "recokd" not in one
    # a diverged run is listed, not averaged in
    diverged = {"method": "recokd", "seed": 2, "status": "diverged", "mean_dice": None, "mean_hd95": None}
    s = efficacy.summarize(runs + [diverged], teacher_dice=0.8, methods=["none", "recokd"])
    assert s["recokd"]["n"] == 2 and s["recokd"]["diverged_seeds"] == [2]
    assert s["recokd"]["mean_dice"] == pytest.approx(0.45)


def test_a_batch_norm_kd_student_is_compared_with_the_batch_norm_plain_student():
    assert efficacy.METHODS["recokd_bn"].baseline == "none_bn"
    assert efficacy.METHODS["none_bn"].baseline == efficacy.METHODS["recokd"].baseline == "none"
    # the strided stem likewise: each KD student against the plain student of its own architecture
    assert efficacy.METHODS["recokd_stem"].baseline == "none_stem"
    assert efficacy.METHODS["recokd_bn_stem"].baseline == "none_bn_stem"
    assert efficacy.METHODS["none_stem"].baseline == efficacy.METHODS["none_bn_stem"].baseline == "none"
    stem = efficacy.METHODS["none_bn_stem"]
    assert (stem.student_norm, stem.student_stem, stem.kd) == ("batch", "strided", None)
    runs = [_run("none", 0, 0.2), _run("none_bn", 0, 0.4), _run("recokd", 0, 0.5), _run("recokd_bn", 0, 0.6)]
    baselines = {m: efficacy.METHODS[m].baseline for m in ("none", "none_bn", "recokd", "recokd_bn")}
    s = efficacy.summarize(runs, 0.8, list(baselines), baselines)
    assert s["recokd_bn"]["baseline"] == "none_bn" and s["recokd_bn"]["delta_dice_vs_plain"] == pytest.approx(0.2)
    assert s["recokd_bn"]["gap_recovery_per_seed"]["values"] == [pytest.approx(0.5)]  # (0.6-0.4)/(0.8-0.4)
    assert s["recokd"]["gap_recovery_per_seed"]["values"] == [pytest.approx(0.5)]  # (0.5-0.2)/(0.8-0.2)
    assert s["none_bn"]["baseline"] == "none" and s["none"]["baseline"] is None


def test_cropped_metrics_equal_whole_grid():
    from ReCoKDLib.evaluate import dice_hd95

    rng = np.random.default_rng(0)
    ref = np.zeros((12, 40, 40), np.uint8)
    pred = np.zeros_like(ref)
    ref[2:8, 5:20, 5:15] = 1
    pred[3:9, 6:22, 4:14] = 1
    ref[5:11, 25:38, 20:39] = 2  # touches the border
    pred[0:3, 30:40, 30:40] = 2
    pred[rng.random(pred.shape) > 0.995] = 3  # class 3: prediction only
    spacing = (3.0, 1.0, 0.8)
    whole = dice_hd95(pred, ref, 5, spacing)
    cropped = efficacy.dice_hd95_cropped(pred, ref, 5, spacing)
    assert cropped[0] == pytest.approx(whole[0])
    assert [h is None for h in cropped[1]] == [h is None for h in whole[1]]
    assert [h for h in cropped[1] if h is not None] == pytest.approx([h for h in whole[1] if h is not None])
    with pytest.raises(BenchmarkError, match="one grid"):
        efficacy.dice_hd95_cropped(pred, ref[:5], 5, spacing)


# ---------------------------------------------------------------------------------------------
# Report


def _efficacy_json(kd_dice):
    runs = [dict(_run("none", s, d), params=1000, dice={"liver": d}) for s, d in ((0, 0.30), (1, 0.34))]
    runs += [dict(_run("recokd", s, d), params=1000, dice={"liver": d}) for s, d in zip((0, 1), kd_dice)]
    return {"date": "2026-01-02T03:04:05+00:00", "machine": {"cpu": "TestCPU", "threads": 2, "torch": "2.13.0"},
            "git_commit": "abcdef1234567890", "command": "python benchmarks/efficacy.py",
            "config": {"budget": {"name": "cpu"}}, "gap_recovery_definition": "def",
            "datasets": {"ct": {"dataset": "CTSet", "train_cases": ["s1"], "test_cases": ["s3"], "classes": ["liver"],
                                "teacher": {"mean_dice": 0.52, "params": 16000, "dice": {"liver": 0.52}},
                                "runs": runs,
                                "summary": efficacy.summarize(runs, 0.52, ["none", "recokd"])}}}


def _write(folder, efficacy_data, readme_text):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "efficacy.json").write_text(json.dumps(efficacy_data))
    readme = folder / "README.md"
    readme.write_text(readme_text)
    return readme


def test_report_writes_table_plots_and_readme_block(tmp_path):
    readme = _write(tmp_path, _efficacy_json((0.40, 0.42)),
                    f"intro\n{report.BEGIN}\nold table\n{report.END}\noutro\n")
    (tmp_path / "pretrained_teacher.json").write_text(json.dumps({
        "date": "2026-01-03", "machine": "M", "command": "python x.py",
        "teacher": {"name": "nnU-Net X", "params": 31000000, "latency_s": 9.5},
        "students": [{"method": "recokd", "params": 2000000, "latency_s": 1.5, "dice_vs_teacher_mean": 0.81,
                      "dice_vs_teacher_sd": 0.02}]}))
    written = report.build_report(tmp_path, readme)
    assert (tmp_path / "dice_per_method.png").stat().st_size > 1000
    assert "latency_params_vs_width.png" not in {p.name for p in written.values()}  # no performance.json
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{report.END}\noutro\n") and "old table" not in text
    block = text.split(report.BEGIN)[1].split(report.END)[0]
    assert "0.520" in block  # teacher
    assert "0.320 ± 0.028" in block  # plain: mean of 0.30, 0.34 and its sd
    assert "0.410 ± 0.014" in block  # ReCo-KD
    # gap recovery per seed: (0.40-0.30)/(0.22) and (0.42-0.34)/(0.18) -> mean 0.45
    assert "0.45" in block
    assert "2026-01-02" in block and "TestCPU" in block and "python benchmarks/efficacy.py" in block
    assert "nnU-Net X" in block and "0.810 ± 0.020" in block
    assert "| recokd | 2 | 0.410 ± 0.014 | +0.090 [-0.037, +0.217] |" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "learning_curves.png").stat().st_size > 1000


def test_report_shows_when_recokd_is_worse(tmp_path):
    readme = _write(tmp_path, _efficacy_json((0.20, 0.22)), f"{report.BEGIN}\n{report.END}\n")
    report.build_report(tmp_path, readme)
    assert "| recokd | 2 | 0.210 ± 0.014 | -0.110 [-0.237, +0.017] |" in (tmp_path / "report.md").read_text()
    assert "-0." in readme.read_text().split(report.BEGIN)[1]  # negative gap recovery shown


def test_readme_markers_required(tmp_path):
    readme = _write(tmp_path, _efficacy_json((0.4, 0.4)), "no markers here\n")
    with pytest.raises(BenchmarkError, match="markers"):
        report.build_report(tmp_path, readme)
    assert readme.read_text() == "no markers here\n"  # untouched
    with pytest.raises(BenchmarkError, match="markers"):
        report.replace_headline(f"{report.END}\n{report.BEGIN}\n", "x")
    assert report.main(["--results-dir", str(tmp_path / "empty")]) == 2


# ---------------------------------------------------------------------------------------------
# Smoke runs of the benchmark scripts (tiny configurations, tmp dirs)


def test_performance_smoke(tmp_path, ct_dataset):
    out = tmp_path / "performance.json"
    assert performance.main(["--smoke", "--in-process", "--threads", "1", "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["models"]) == {"teacher", "student_div4"}
    student = data["models"]["student_div4"]
    assert student["params"] < data["models"]["teacher"]["params"]
    assert student["vs_teacher"]["params"] == pytest.approx(student["params"] / data["models"]["teacher"]["params"])
    assert student["cpu_fp32"]["seconds"] > 0 and student["cpu_fp32"]["volume_shape"]
    steps = data["steps"]["8x16x16"]
    assert set(steps) == {"student", "student+teacher", "student+teacher+recokd"}
    assert "beyond_teacher_forward" in steps["student+teacher+recokd"]
    assert data["onnx"]["volume_max_abs_diff"] < 1e-3
    assert data["command"].startswith("python benchmarks/performance.py") and data["machine"]["torch"]


def test_efficacy_smoke_writes_and_resumes(tmp_path, ct_dataset):
    out, work = tmp_path / "eff.json", tmp_path / "work"
    args = ["--smoke", "--datasets", "ct", "--methods", "none,recokd", "--seeds", "0", "--threads", "1",
            "--work-dir", str(work), "--output", str(out)]
    assert efficacy.main(args) == 0
    data = json.loads(out.read_text())
    block = data["datasets"]["ct"]
    assert block["train_cases"] == ["totalseg_s1"] and block["test_cases"] == ["totalseg_s3"]
    # validation: blocks of the training volume, never the test case
    split = block["validation_split"]["volumes"]["totalseg_s1"]
    assert split["blocks"] and 0 < split["held_out_fraction"] < 1
    # selection: three candidates of seed 0 on validation, the chosen one's run in the runs
    selection = block["selection"]["recokd"]
    assert len(selection["candidates"]) == 3 and all(c["val_dice"] is not None for c in selection["candidates"])
    chosen = selection["chosen"]
    assert selection["candidates"][chosen]["val_dice"] == max(c["val_dice"] for c in selection["candidates"])
    assert [(r["method"], r["seed"]) for r in block["runs"]] == [("none", 0), ("recokd", 0)]
    assert {r["candidate"] for r in block["runs"] if r["method"] == "recokd"} == {chosen}
    run = block["runs"][1]
    assert set(run["dice"]) == set(block["classes"]) and len(block["classes"]) == 11
    assert run["teacher_mean_dice"] == block["teacher"]["mean_dice"]
    assert run["plain_student_mean_dice"] == block["runs"][0]["mean_dice"]
    assert run["train_seconds"] > 0 and run["curve"] and run["best_val_dice"] is not None
    # the budget asks for bf16: what ran is bf16 only where oneDNN has bf16 kernels
    kernels = data["machine"]["cpu_bf16_kernels"]
    assert run["precision"] == block["teacher"]["precision"] == ("bf16" if kernels else "fp32")
    summary = block["summary"]["recokd"]
    assert summary["n"] == 1 and summary["paired_diff_vs_plain"]["n"] == 1
    assert len(data["config"]["methods"]["recokd"]["candidates"]) == 3 and data["git_commit"]
    # a second start trains and evaluates nothing again (finished runs and the teacher are reused)
    again = efficacy.run_benchmark(efficacy.SMOKE, ["ct"], ["none", "recokd"], [0], work, out, "cpu", 1,
                                   log=lambda msg: None)["datasets"]["ct"]
    assert all(r["reused_training"] for r in again["runs"]) and again["teacher"]["reused_training"]
    assert [r["mean_dice"] for r in again["runs"]] == [r["mean_dice"] for r in block["runs"]]
    # --reuse-selection: a fresh work dir trains only the candidate chosen before, and says so
    fresh = efficacy.run_benchmark(efficacy.SMOKE, ["ct"], ["none", "recokd"], [0], tmp_path / "work2",
                                   tmp_path / "eff2.json", "cpu", 1, log=lambda msg: None, reuse_selection=data)
    reused = fresh["datasets"]["ct"]["selection"]["recokd"]
    assert reused["chosen"] == chosen and reused["candidates"] == selection["candidates"]
    assert reused["reused_from"]["date"] == data["date"] and reused["chosen_run_now"]["test_mean_dice"] is not None
    assert len(list((tmp_path / "work2" / "ct").glob("recokd-c*"))) == 1
    assert [r["method"] for r in fresh["datasets"]["ct"]["runs"]] == ["none", "recokd"]


def test_holdout_split_withholds_validation_labels_from_training():
    from ReCoKDLib.data.sampling import CaseArrays, CaseSet

    label = np.zeros((1, 20, 8, 8), np.int16)
    label[0, :, 2:6, 2:6] = 1
    case_set = CaseSet([CaseArrays("a", np.zeros((1, 20, 8, 8), np.float32), label)], ["background", "organ"])
    split, record = efficacy.holdout_split(case_set, block=4, every=2)
    assert record["volumes"]["a"]["blocks"] == [(4, 8), (12, 16)]
    train, val = split.cases
    assert train.case_id == "a" and val.case_id == "a_val"
    held = np.zeros(20, bool)
    held[4:8] = held[12:16] = True
    assert (train.label[0, held] == -1).all() and (train.label[0, ~held] == label[0, ~held]).all()
    assert (val.label[0, ~held] == -1).all() and (val.label[0, held] == label[0, held]).all()
    assert split.label_spec.ignore_label is not None  # the engine counts -1 in no loss and no Dice


def test_paired_difference_interval():
    d = efficacy.paired_difference({0: 0.5, 1: 0.6, 2: 0.7}, {0: 0.4, 1: 0.4, 2: 0.5})
    assert d["mean"] == pytest.approx(0.1667, abs=1e-4) and d["n"] == 3
    half = 4.303 * np.std([0.1, 0.2, 0.2], ddof=1) / np.sqrt(3)
    assert d["ci95"] == pytest.approx([d["mean"] - half, d["mean"] + half])
    assert efficacy.paired_difference({0: 0.5}, {0: 0.4})["ci95"] is None
    assert efficacy.select_candidate([0.3, 0.5, 0.5]) == 1 and efficacy.select_candidate([0.3, None]) is None


def test_efficacy_rejects_unknown_method(capsys):
    with pytest.raises(SystemExit):
        efficacy.main(["--methods", "recokd,nope"])
    assert "nope" in capsys.readouterr().err


def test_report_says_what_limits_the_result():
    """The limits are read off the JSON: data (teacher validation vs test), room (teacher lead and
    its classes, vs the seed spread), steps (plateau or cap) and loss weights at the grid's edge."""
    runs = [dict(_run("none", s, d), dice={"liver": d, "aorta": 0.1}, steps=2000, best_step=b, stopped_early=False)
            for s, d, b in ((0, 0.30, 2000), (1, 0.34, 1900))]
    runs += [dict(_run("recokd", 0, 0.35), dice={"liver": 0.35, "aorta": 0.1}, steps=900, best_step=400,
                  stopped_early=True)]
    runs[0]["curve"] = [[500, 0.2], [1500, 0.3], [1600, 0.35], [2000, 0.36]]  # +0.06 in the last quarter
    candidates = [{"hyperparameters": {"kd_weight": w, "options": {}}} for w in (0.001, 0.01, 0.1)]
    block = {"train_cases": ["s1"], "test_cases": ["s3"], "classes": ["liver", "aorta"],
             "teacher": {"mean_dice": 0.52, "best_val_dice": 0.90, "dice": {"liver": 0.52, "aorta": 0.15}},
             "runs": runs, "summary": efficacy.summarize(runs, 0.52, ["none", "recokd"]),
             "selection": {"recokd": {"chosen": 2, "candidates": candidates},
                           "logit": {"chosen": 1, "candidates": candidates}}}
    text = report.limits_section(block, 2000)
    assert "0.900 on the held-out slices" in text and "0.520 on the test scan (s3); one training volume" in text
    assert "generalisation across scans" in text
    assert "leads the plain student by +0.200 mean Dice" in text and "gap recovery is mostly noise" not in text
    assert "1 of 2 classes carry a lead of 0.1 or more: liver (+0.20)" in text
    assert "1 of 3 student runs stopped at their validation plateau; 2 ran the whole budget of 2,000 steps" in text
    assert "best validation at steps 400–2,000" in text and "longer budget" in text
    assert "still rose by +0.060 (median; +0.060 to +0.060)" in text
    assert "recokd (lambda=0.100, the largest tried)" in text and "logit" not in text.split("Loss weight")[1]
    block["teacher"]["best_val_dice"] = 0.55
    block["summary"]["none"]["sd_dice"] = 0.15
    text = report.limits_section(block, 2000)
    assert "about as well as to its own held-out slices" in text and "gap recovery is mostly noise" in text


def test_report_names_each_datasets_own_run(tmp_path):
    data = _efficacy_json((0.40, 0.42))
    data["datasets"]["ct"]["provenance"] = {"date": "2026-02-03", "machine": {"cpu": "OtherCPU", "threads": 1},
                                            "git_commit": "0123456789abcdef", "command": "python efficacy.py --datasets ct"}
    data["note"] = "ct rerun alone"
    data["datasets"]["ct"]["selection"] = {"recokd": {
        "chosen": 0, "candidates": [{"label": "lambda=0.01", "val_dice": 0.5, "test_mean_dice": 0.4}],
        "reused_from": {"date": "2026-01-01", "git_commit": "fedcba9876543210", "command": "python efficacy.py"},
        "chosen_run_now": {"val_dice": 0.52, "test_mean_dice": 0.41}}}
    readme = _write(tmp_path, data, f"{report.BEGIN}\n{report.END}\n")
    report.build_report(tmp_path, readme)
    assert ("recokd: the choice and these candidate scores are those of the run of 2026-01-01 (commit fedcba987654; "
            "`--reuse-selection`); the chosen candidate was trained again here: validation Dice 0.520, test 0.410."
            in (tmp_path / "report.md").read_text())
    for text in (readme.read_text(), (tmp_path / "report.md").read_text()):
        assert "(CTSet): 2026-02-03 on OtherCPU, 1 thread, commit 0123456789ab; `python efficacy.py --datasets ct`" in text
        assert "Note: ct rerun alone" in text and "TestCPU" not in text


def test_efficacy_student_steps_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        efficacy.main(["--student-steps", "0"])
    assert "--student-steps must be >= 1" in capsys.readouterr().err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_efficacy_pool_workers_die_with_the_benchmark(tmp_path):
    """A killed benchmark leaves no worker training on (a resumed run would share its run folders)."""
    import os
    import subprocess
    import time

    script = tmp_path / "parent.py"
    script.write_text(
        "import sys, time\n"
        f"sys.path.insert(0, {str(BENCH)!r})\n"
        "import efficacy\n"
        "if __name__ == '__main__':\n"
        "    pool = efficacy._Pool(2)\n"
        "    pool._executor.submit(time.sleep, 120)  # starts the workers\n"
        "    time.sleep(2)\n"
        "    print(' '.join(str(pid) for pid in pool._executor._processes), flush=True)\n"
        "    time.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    workers = [int(pid) for pid in parent.stdout.readline().split()]
    assert workers
    parent.kill()  # SIGKILL: no clean-up in the parent
    parent.wait()

    def running(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
        except OSError:
            return False

    deadline = time.monotonic() + 30
    while any(running(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [pid for pid in workers if running(pid)]
    for pid in left:
        os.kill(pid, 9)
    assert not left, f"workers {left} outlived the killed benchmark"


def test_student_architecture_speed_smoke(tmp_path):
    """benchmarks/student_architecture_speed.py on a tiny window: every variant timed, the strided-stem
    student has no full-resolution stage and the ÷4 widths."""
    import student_architecture_speed as bench

    out = tmp_path / "arch.json"
    assert bench.main(["--teacher", "preset", "--window", "8,32,32", "--reps", "2", "--engine", "onnxruntime",
                       "--precision", "fp32", "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    results = data["results"]
    assert set(results) == {"teacher", "div4", "div4_batch", "div4_strided_stem"}
    assert all(r["seconds"] > 0 and len(r["seconds_all"]) == 2 for r in results.values())
    assert results["teacher"]["teacher_over_this"] == 1.0 and data["config"]["weights"] == "untrained"
    stem = results["div4_strided_stem"]
    assert stem["strided_stem"] and stem["filters"] == results["div4"]["filters"][1:]
    assert results["div4_batch"]["norm"] == "batch" and results["div4"]["params"] < results["teacher"]["params"] / 10
