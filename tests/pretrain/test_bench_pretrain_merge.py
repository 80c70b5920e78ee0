"""The pre-training benchmark's report merges a new call's runs into the earlier results file: the old rows, size
search, convergence and headline stay, the new runs are added as rows of a new call, the top-level keys stay, and
each so8t_hf row's label says the micro-batch, accumulation and optimizer-in-backward its run used."""

import json
import sys

from paths import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_pretrain  # noqa: E402

EARLIER = REPO / "benchmarks" / "results" / "pretrain_h100.json"
NEW = dict(ok=True, params=1515948032, peak_gib=9.1, peak_reserved_gib=9.3, tokens_per_s=30000.0, mfu=0.28,
           tokens_per_step=16384, micro_batch=16, accumulation=1, optimizer_in_backward=True, block=1024,
           step_times=[0.6, 0.55, 0.55], timed_steps=2, losses=[10.7, 10.5, 10.2], grad_norms=[20.0, 9.0, 5.0],
           finite=True, device="NVIDIA H100 80GB HBM3, 79.2 GiB", versions={"torch": "2.11.0"},
           profile={"steps": 1, "wall_ms": 550.0, "device_self_ms": 500.0, "line": "1 step", "table": "T"})


def _compose(tmp_path, runs: dict, *flags):
    (tmp_path / "runs").mkdir(parents=True)
    for name, run in runs.items():
        (tmp_path / "runs" / f"{name}.json").write_text(json.dumps(run))
    bench_pretrain.main(["--compose", *flags, "--out", str(tmp_path)])
    return json.loads((tmp_path / "pretrain_h100.json").read_text()), (tmp_path / "pretrain_h100.md").read_text()


def test_new_runs_are_added_and_the_earlier_figures_stay(tmp_path):
    old = json.loads(EARLIER.read_text())
    merged, md = _compose(tmp_path, {"so8t_hf": NEW}, "--merge_into", str(EARLIER), "--note", "new call")
    for key in ("params", "peak_gib", "tokens_per_s", "mfu", "baseline", "max_trainable_params_10gib", "convergence"):
        assert key in merged, key
    # the headline run (so8t_hf_oib16) and the baseline were not measured again: the earlier figures stay
    assert merged["headline"] == old["headline"] == {"run": "so8t_hf_oib16", "call": 1}
    assert merged["tokens_per_s"] == old["tokens_per_s"] and merged["params"] == old["params"]
    assert merged["baseline"]["uncapped"]["tokens_per_s"] == old["baseline"]["uncapped"]["tokens_per_s"]
    assert merged["max_trainable_params_10gib"] == old["max_trainable_params_10gib"]
    assert merged["convergence"] == old["convergence"] and merged["size_search"] == old["size_search"]
    assert merged["notes"] == [*old["notes"], "new call"]
    call = len(old["calls"])
    assert [(r["call"], r["name"]) for r in merged["rows"]] == [
        *[(r["call"], r["name"]) for r in old["rows"]], (call, "so8t_hf")]
    assert merged["so8t_hf"]["tokens_per_s"] == 30000.0 and merged["calls"][call]["device"] == NEW["device"]
    assert merged["rows"][-1]["profile"]["device_self_ms"] == 500.0
    # so8t_hf is the recipe as configured: the label says what each call's run was
    assert merged["so8t_hf"]["label"] == "so8t_hf recipe + optimizer in backward, 16 x 1024 x acc 1, cap"
    assert f"| {call} | so8t_hf recipe + optimizer in backward, 16 x 1024 x acc 1, cap | 1.516 | 9.10 (9.30) | 30,000" in md
    assert "| 0 | so8t_hf recipe, 1 x 1024 x acc 16, cap | 1.516 | 9.49 (9.56) | 4,715 | 4.3%" in md
    assert "| 1 | so8t_hf recipe, 1 x 1024 x acc 16, cap | 1.516 | 9.49 (9.59) | 4,139 | 3.8%" in md
    assert "| 1 | so8t_hf + optimizer in backward, 16 x 1024 x acc 1, cap | 1.516 | 9.21 (9.99) | 33,984 | 31.3%" in md
    # --headline moves the top-level figures to another run
    again, _ = _compose(tmp_path / "again", {"so8t_hf_acc16": {**NEW, "tokens_per_s": 5000.0, "micro_batch": 1,
                                                                 "accumulation": 16, "optimizer_in_backward": False}},
                        "--merge_into", str(tmp_path / "pretrain_h100.json"), "--headline", "so8t_hf_acc16")
    assert len(again["rows"]) == len(old["rows"]) + 2 and len(again["calls"]) == call + 2
    assert again["tokens_per_s"] == 5000.0 and again["headline"] == {"run": "so8t_hf_acc16", "call": call + 1}
    assert again["so8t_hf_acc16"]["label"] == "so8t_hf, 1 x 1024 x acc 16, cap"


def test_a_one_call_results_file_becomes_rows_of_call_0_with_the_recipe_of_then(tmp_path):
    run = {k: v for k, v in NEW.items() if k not in ("micro_batch", "accumulation", "optimizer_in_backward", "block")}
    oom = dict(ok=False, oom=True, error="OutOfMemoryError", peak_gib=9.9)
    (tmp_path / "old.json").write_text(json.dumps(dict(
        device="H100", versions={}, command="bench", cap_gib=10.0, notes=["old"], so8t_hf={**run, "tokens_per_s": 4700.0},
        baseline=dict(capped=oom, uncapped={**run, "tokens_per_s": 7000.0}), max_trainable_params_10gib=1515948032,
        size_search=[dict(layers=24, params=1515948032, peak_gib=9.49, fits=True)])))
    merged, md = _compose(tmp_path / "new", {"so8t_hf_oib8": {**NEW, "micro_batch": 8}}, "--merge_into",
                          str(tmp_path / "old.json"))
    assert [(r["call"], r["name"]) for r in merged["rows"]] == [
        (0, "so8t_hf"), (0, "hf_trainer_capped"), (0, "hf_trainer_uncapped"), (1, "so8t_hf_oib8")]
    assert merged["rows"][0]["label"] == "so8t_hf recipe, 1 x 1024 x acc 16, cap"  # that format predates oib
    assert merged["rows"][0]["micro_batch"] == 1 and merged["rows"][0]["accumulation"] == 16
    assert merged["headline"] == {"run": "so8t_hf", "call": 0} and merged["tokens_per_s"] == 4700.0
    assert merged["max_trainable_params_10gib"] == 1515948032
    assert "| 1 | so8t_hf + optimizer in backward, 8 x 1024 x acc 1, cap |" in md
    assert "| 0 | HF Trainer + sdpa + AdamW, cap | - | 9.90 (-) |" in md and "out of memory" in md
