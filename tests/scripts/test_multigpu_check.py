"""scripts/multigpu_check.py (issue 11's one-call check) on the CPU: 2 gloo processes follow one process of the
same global batch, and the results JSON has the issue's shape."""

import json
import sys

from paths import REPO

sys.path.insert(0, str(REPO / "scripts"))
import multigpu_check  # noqa: E402


def test_cpu_smoke_writes_the_issue_json_and_ddp_follows_single(tmp_path):
    result = multigpu_check.main(["--cpu", "--out", str(tmp_path), "--steps", "3"])
    on_disk = json.loads((tmp_path / "multigpu_h200x2.json").read_text())
    assert on_disk["runs"] == result["runs"] and on_disk["device"].startswith("CPU")
    single, ddp = on_disk["runs"]
    assert (single["name"], ddp["name"]) == ("single", "ddp") and single["rc"] == ddp["rc"] == 0
    assert ddp["max_loss_diff_vs_single"] is not None and ddp["max_loss_diff_vs_single"] < 1e-4
    assert "tokens_per_s" in single and "| ddp | 0 |" in (tmp_path / "multigpu_h200x2.md").read_text()


def test_loss_diff_and_rate_helpers():
    a = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "tokens_per_second": 10.0}]
    b = [{"step": 1, "loss": 2.1}, {"step": 2, "loss": 1.0}, {"step": 3, "loss": 0.5}]
    assert abs(multigpu_check.max_loss_diff(a, b) - 0.5) < 1e-12
    assert multigpu_check.max_loss_diff(a, [{"step": 9, "loss": 1.0}]) is None
    assert multigpu_check.tokens_per_s(a) == 0.0  # only steps after the warm-up count
    assert multigpu_check.with_flag(["--x", "1", "--y", "2"], "--x", "3") == ["--x", "3", "--y", "2"]
