"""benchmarks/train_worker.py's `gpu_idle`: gaps between busy intervals of the device, charged to the innermost host op
that spans each gap."""

import sys

from paths import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from train_worker import gpu_idle  # noqa: E402


def test_gaps_are_charged_to_the_innermost_host_op_spanning_them():
    kernels = [(0, 100), (50, 200),  # overlapping: one busy interval 0-200
               (300, 400),  # a 100 us gap after it
               (410, 500),  # 10 us: under the 20 us floor
               (1500, 1600)]  # a 1000 us gap
    ops = [(0, 2000, "Optimizer.step", "Optimizer.step"),
           (150, 450, "aten::item", "Optimizer.step"),  # spans the first gap only
           (600, 1550, "collate", "DataLoader.__next__")]  # spans only part of the second: not charged
    idle = gpu_idle(kernels, ops, steps=2)
    assert idle["idle_ms_per_step"] == round((100 + 1000) / 1e3 / 2, 2)
    assert idle["gaps_per_step"] == 1.0
    assert idle["by_host_op"] == [
        {"outermost": "Optimizer.step", "innermost": "Optimizer.step", "ms_per_step": 0.5},
        {"outermost": "Optimizer.step", "innermost": "aten::item", "ms_per_step": 0.05},
    ]


def test_a_gap_no_host_op_spans_is_named_so():
    idle = gpu_idle([(0, 10), (100, 110)], [(20, 30, "a", "a")], steps=1)
    assert idle["by_host_op"] == [{"outermost": "(no single host op)", "innermost": "", "ms_per_step": 0.09}]
    assert gpu_idle([], [], steps=1) == {"idle_ms_per_step": 0.0, "gaps_per_step": 0.0, "by_host_op": []}


def test_the_profile_summary_reads_a_real_profile():
    import torch

    from train_worker import _profile_summary

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        (torch.randn(64, 64) @ torch.randn(64, 64)).sum()
    summary = _profile_summary(prof, steps=1, wall=0.01)
    assert summary["gpu_idle"] == {"idle_ms_per_step": 0.0, "gaps_per_step": 0.0, "by_host_op": []}  # no device
    assert "GPU idle between kernels" in summary["table"]


def test_kernel_sites_charge_device_time_to_the_launching_op_and_its_layer_code():
    from train_worker import kernel_sites

    launches = [
        ("copy_kernel", 300.0, ["aten::copy_", "aten::contiguous", "LoraLinearFunction", "Trainer.train"]),
        ("copy_kernel", 100.0, ["aten::copy_", "aten::contiguous", "LoraLinearFunction", "Trainer.train"]),
        ("copy_kernel", 50.0, ["aten::copy_", "autograd::engine::evaluate_function: CatBackward0"]),
        ("gemm", 1000.0, ["aten::mm"]),
    ]
    sites = kernel_sites(launches, steps=2)
    assert sites == [
        {"kernel": "gemm", "host_op": "aten::mm", "within": "aten::mm", "ms_per_step": 0.5},
        {"kernel": "copy_kernel", "host_op": "aten::copy_", "within": "LoraLinearFunction", "ms_per_step": 0.2},
        {"kernel": "copy_kernel", "host_op": "aten::copy_",
         "within": "autograd::engine::evaluate_function: CatBackward0", "ms_per_step": 0.03},
    ]
    assert kernel_sites(launches, steps=1, top=1)[0]["ms_per_step"] == 1.0
