"""Several processes as they really run (the 2-process DDP / FSDP2 runs themselves: tests/scripts/test_multigpu_check):
`accelerate launch --cpu --num_processes 2` starts one process, which starts the 2 gloo processes itself; an
accelerate config's bf16 is not applied on CPU unless asked for."""

import json
import subprocess
import sys

import pytest

from paths import REPO

from so8t_hf.training import SO8TConfig
from so8t_hf.training.distributed import cpu_mixed_precision, cpu_relaunch_argv


@pytest.mark.slow
@pytest.mark.parametrize("config, kind", [("ddp.yaml", "MULTI_CPU"), ("fsdp2.yaml", "FSDP")])
def test_accelerate_cpu_with_several_processes_trains_on_that_many(tmp_path, config, kind):
    """The line users type: before, it trained on one process, silently."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--config_file",
           str(REPO / "recipes/accelerate" / config), str(REPO / "recipes/thinking_sft.py"),
           "--config", str(REPO / "recipes/configs/tiny.yaml"), "--output_dir", str(tmp_path / "run"),
           "--max_steps", "2"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "starting 2 CPU (gloo) processes" in proc.stderr
    assert "process 0 of 2" in proc.stderr and "process 1 of 2" in proc.stderr
    ran = json.loads((tmp_path / "run" / "run_summary.json").read_text())["distributed"]
    assert (ran["world_size"], ran["distributed_type"], ran["backend"], ran["mixed_precision"]) == (2, kind, "gloo", "no")
    assert ran["sharded"] is (kind == "FSDP")


def test_the_relaunch_drops_cpu_and_asks_the_recipe_for_cpu_processes(tmp_path):
    cfg = tmp_path / "acc.yaml"
    cfg.write_text("distributed_type: MULTI_GPU\nnum_processes: 3\n")
    n, argv = cpu_relaunch_argv(["--cpu", "--config_file", str(cfg), "train.py", "--config", "x.yaml"])
    assert n == 3 and argv == ["--config_file", str(cfg), "--num_processes", "3", "train.py", "--config", "x.yaml",
                               "--use_cpu", "true"]
    n, argv = cpu_relaunch_argv(["--num_processes", "2", "--cpu", "t.py", "--use_cpu", "true"])
    assert n == 2 and argv == ["--num_processes", "2", "t.py", "--use_cpu", "true"]
    assert cpu_relaunch_argv(["--cpu", "--num_processes", "1", "t.py"]) is None  # one process: nothing to fix
    assert cpu_relaunch_argv(["--num_processes", "2", "t.py"]) is None  # no --cpu: accelerate starts them itself


def test_an_unreadable_cpu_launch_is_refused_not_run_on_one(monkeypatch):
    from so8t_hf.training import distributed

    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", distributed.RELAUNCHED):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(distributed, "_launcher_argv", lambda pid: None)
    with pytest.raises(RuntimeError, match="started ONE process.*--use_cpu true"):
        distributed.check_launch()


def test_an_accelerate_config_bf16_is_not_applied_on_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --config_file ddp.yaml` sets
    args = SO8TConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none")  # tiny.yaml: bf16 false
    assert args.mixed_precision == "bf16" and not args.bf16
    cpu_mixed_precision(args)
    assert args.mixed_precision == "no"
