"""benchmarks/bench_train.py: the `unsloth` runs get their own site first on PYTHONPATH, and every planned run that
has no result (not staged, failed, out of time) is written into the results with why, never dropped."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

from paths import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_train  # noqa: E402


def _args(tmp_path, site):
    return SimpleNamespace(steps=36, ladder_steps=10, profile_steps=3, only=None, tries=[], unsloth_site=str(site),
                           checkpoint="/ckpt", warmup=4, memory_trace=False, out=str(tmp_path), timeout=400.0)


def test_every_workload_plans_an_unsloth_run(tmp_path):
    names = [r["name"] for r in bench_train.plan(_args(tmp_path, tmp_path / "none"))]
    for workload in bench_train.WORKLOADS:
        assert f"{workload}.unsloth" in names


def test_unsloth_is_not_runnable_until_its_site_is_staged(tmp_path):
    run = dict(system="unsloth", name="lora_4x2048.unsloth")
    why = bench_train.not_runnable(run, _args(tmp_path, tmp_path / "site"))
    assert why and "not staged" in why and "fetch_unsloth.sh" in why
    (tmp_path / "site" / "unsloth").mkdir(parents=True)
    (tmp_path / "site" / "unsloth" / "__init__.py").write_text("")
    assert bench_train.not_runnable(run, _args(tmp_path, tmp_path / "site")) is None
    assert bench_train.not_runnable(dict(system="trl_stock", name="x"), _args(tmp_path, tmp_path / "none")) is None


def test_only_unsloth_runs_see_its_site_on_pythonpath(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/stock")
    args = _args(tmp_path, "/dev/shm/site_unsloth")
    seen = {}
    with mock.patch.object(bench_train.subprocess, "Popen", side_effect=lambda cmd, env, **kw: seen.update(
            {cmd[cmd.index("--system") + 1]: env["PYTHONPATH"]})):
        for system in ("unsloth", "trl_stock", "so8t_hf"):
            run = dict(name=f"lora_4x2048.{system}", system=system, batch=4, length=2048, packing="true", steps=36,
                       profile=0, qlora=False, legacy=False, override="")
            bench_train.launch(run, args, tmp_path, tmp_path / "gpu.lock", tmp_path)
    assert seen == {"unsloth": "/dev/shm/site_unsloth:/stock", "trl_stock": "/stock", "so8t_hf": "/stock"}


def test_failure_names_the_last_error_line(tmp_path):
    log = tmp_path / "run.log"
    log.write_text("loading\nTraceback (most recent call last):\n  File x\nValueError: padding_free needs packing\n")
    assert bench_train.failure(log) == "ValueError: padding_free needs packing"
    assert bench_train.failure(tmp_path / "missing.log") == "no output"


def _result(tokens_per_s):
    return dict(tokens_per_s=tokens_per_s, peak_gib=10.0, step_times=[0.5] * 40, tokens_per_s_median_step=tokens_per_s,
                timed_steps=36, system="trl_stock", attn_implementation="sdpa", losses=[11.0, 7.0])


def test_report_writes_runs_without_results_in_their_place(tmp_path):
    args = _args(tmp_path, tmp_path / "none")
    results = {"lora_4x2048.trl_stock": _result(4600.0)}
    not_run = {"lora_4x2048.unsloth": "Unsloth is not staged at /x", "ladder.packing": "failed (rc 1): OOM"}
    with mock.patch.object(bench_train, "device_name", return_value="NVIDIA H100 80GB HBM3"):
        bench_train.report(args, results, "rows", "cmd", 1.0, quiet=True, not_run=not_run)
    md = (tmp_path / "train_h100.md").read_text()
    assert "| unsloth | not run: Unsloth is not staged at /x |" in md
    assert "not run: failed (rc 1): OOM" in md
    workload = json.loads((tmp_path / "train_h100.json").read_text())["workloads"][0]
    assert workload["workload"] == "lora_4x2048"
    assert [r["name"] for r in workload["runs"]] == ["trl_stock", "unsloth"]
    assert workload["runs"][1] == {"name": "unsloth", "not_run": "Unsloth is not staged at /x"}
    assert {"rung": "packing", "not_run": "failed (rc 1): OOM"}.items() <= next(
        r for r in workload["ladder"] if r["rung"] == "packing").items()


def test_a_workload_with_only_unrunnable_runs_is_still_reported(tmp_path):
    args = _args(tmp_path, tmp_path / "none")
    with mock.patch.object(bench_train, "device_name", return_value="no GPU"):
        bench_train.report(args, {}, "rows", "cmd", 1.0, quiet=True, not_run={"qlora_1x2048.unsloth": "why"})
    runs = json.loads((tmp_path / "train_h100.json").read_text())["workloads"][0]
    assert runs == {"workload": "qlora_1x2048", "runs": [{"name": "unsloth", "not_run": "why"}]}
    assert Path(tmp_path / "train_h100.md").read_text().count("not run: why") == 1
