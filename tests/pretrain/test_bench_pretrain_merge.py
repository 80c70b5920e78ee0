"""The pre-training benchmark's report merges a new call's runs into the earlier results file: the old rows, size
search and convergence stay, the new runs are added as rows of a new call, the top-level keys stay."""

import json
import sys

from paths import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_pretrain  # noqa: E402

EARLIER = REPO / "benchmarks" / "results" / "pretrain_h100.json"


def test_new_runs_are_added_and_the_earlier_figures_stay(tmp_path):
    old = json.loads(EARLIER.read_text())
    runs = tmp_path / "runs"
    runs.mkdir()
    new = dict(ok=True, params=1515948032, peak_gib=9.1, peak_reserved_gib=9.3, tokens_per_s=30000.0, mfu=0.28,
               tokens_per_step=16384, micro_batch=16, accumulation=1, optimizer_in_backward=True,
               step_times=[0.6, 0.55, 0.55], timed_steps=2, losses=[10.7, 10.5, 10.2], grad_norms=[20.0, 9.0, 5.0],
               finite=True, device="NVIDIA H100 80GB HBM3, 79.2 GiB", versions={"torch": "2.11.0"},
               profile={"steps": 1, "wall_ms": 550.0, "device_self_ms": 500.0, "line": "1 step", "table": "T"})
    (runs / "so8t_hf_oib16.json").write_text(json.dumps(new))
    bench_pretrain.main(["--compose", "--merge_into", str(EARLIER), "--note", "new call", "--out", str(tmp_path)])
    merged = json.loads((tmp_path / "pretrain_h100.json").read_text())
    for key in ("params", "peak_gib", "tokens_per_s", "mfu", "baseline", "max_trainable_params_10gib", "convergence"):
        assert key in merged, key
    # the recipe's headline figures and the baseline were not measured again: the earlier ones stay
    assert merged["tokens_per_s"] == old["tokens_per_s"] and merged["params"] == old["params"]
    assert merged["baseline"]["uncapped"]["tokens_per_s"] == old["baseline"]["uncapped"]["tokens_per_s"]
    assert merged["max_trainable_params_10gib"] == old["max_trainable_params_10gib"]
    assert merged["convergence"] == old["convergence"] and merged["size_search"] == old["size_search"]
    assert merged["notes"] == [*old["notes"], "new call"]
    assert [(r["call"], r["name"]) for r in merged["rows"]] == [
        (0, "so8t_hf"), (0, "hf_trainer_capped"), (0, "hf_trainer_uncapped"), (1, "so8t_hf_oib16")]
    assert merged["so8t_hf_oib16"]["tokens_per_s"] == 30000.0 and merged["calls"][1]["device"] == new["device"]
    assert merged["rows"][-1]["profile"]["device_self_ms"] == 500.0
    md = (tmp_path / "pretrain_h100.md").read_text()
    assert "| 1 | so8t_hf + optimizer in backward, 16 x 1024 x acc 1, cap | 1.516 | 9.10 (9.30) | 30,000 | 28.0%" in md
    assert "| 0 | so8t_hf recipe, 1 x 1024 x acc 16, cap | 1.516 | 9.49 (9.56) | 4,715 | 4.3%" in md
    # merging again into the merged file keeps every row
    again = tmp_path / "again"
    (again / "runs").mkdir(parents=True)
    (again / "runs" / "so8t_hf.json").write_text(json.dumps({**new, "tokens_per_s": 5000.0, "micro_batch": 1}))
    bench_pretrain.main(["--compose", "--merge_into", str(tmp_path / "pretrain_h100.json"), "--out", str(again)])
    twice = json.loads((again / "pretrain_h100.json").read_text())
    assert len(twice["rows"]) == 5 and len(twice["calls"]) == 3
    assert twice["tokens_per_s"] == 5000.0 and twice["headline"] == {"run": "so8t_hf", "call": 2}
