"""Several processes as they really run (the 2-process DDP / FSDP2 runs themselves: tests/scripts/test_multigpu_check):
`accelerate launch --cpu --num_processes 2` starts one process, which is refused with the line that works; an
accelerate config's bf16 is not applied on CPU unless asked for."""

import subprocess
import sys

from paths import REPO

from so8t_hf.training import SO8TConfig
from so8t_hf.training.distributed import cpu_mixed_precision


def test_accelerate_cpu_with_several_processes_is_refused_not_run_on_one(tmp_path):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--config_file",
           str(REPO / "recipes/accelerate/ddp.yaml"), str(REPO / "recipes/thinking_sft.py"),
           "--config", str(REPO / "recipes/configs/tiny.yaml"), "--output_dir", str(tmp_path / "run")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "started ONE process" in proc.stderr and "--use_cpu true" in proc.stderr
    assert not (tmp_path / "run" / "training_log.json").exists()


def test_an_accelerate_config_bf16_is_not_applied_on_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --config_file ddp.yaml` sets
    args = SO8TConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none")  # tiny.yaml: bf16 false
    assert args.mixed_precision == "bf16" and not args.bf16
    cpu_mixed_precision(args)
    assert args.mixed_precision == "no"
