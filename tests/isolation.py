"""Run Python in a fresh process where `so8t_hf` cannot be imported (remote-code checks)."""

import os
import subprocess
import sys
from pathlib import Path

REMOTE_LOAD = """
import sys
sys.modules["so8t_hf"] = None  # this process cannot import the project
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
assert type(model).__name__ == "So8tPhi3ForCausalLM", type(model)
assert "so8t_hf" not in type(model).__module__, type(model).__module__
ids, expected = torch.load(sys.argv[2])
with torch.no_grad():
    logits = model(ids).logits
print("MAXDIFF", (logits - expected).abs().max().item())
"""


def run_isolated(code: str, *args: str, tmp_path: Path) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def remote_load_max_diff(model_dir: Path, ids, expected, tmp_path: Path) -> float:
    """Load `model_dir` with remote code in an isolated process; max |logits - expected| on `ids`."""
    import torch

    torch.save((ids, expected), tmp_path / "expected.pt")
    out = run_isolated(REMOTE_LOAD, str(model_dir), str(tmp_path / "expected.pt"), tmp_path=tmp_path)
    return float(out.split("MAXDIFF")[1])
