"""benchmarks/memory_trace.py: the trace is replayed to the peak, and the blocks live then are grouped by the
innermost frame outside torch."""

import sys

from paths import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from memory_trace import live_at_peak  # noqa: E402


def _frames(*names):
    return [{"filename": "/x/site-packages/torch/autograd/graph.py", "line": 1, "name": "backward"},
            *({"filename": f"/repo/so8t_hf/{n}.py", "line": 7, "name": n} for n in names)]


def test_live_at_peak_groups_the_blocks_live_at_the_highest_point():
    gib = 2**30
    events = [
        {"action": "alloc", "addr": 1, "size": gib, "frames": _frames("chain")},
        {"action": "alloc", "addr": 2, "size": 2 * gib, "frames": _frames("recompute")},
        {"action": "alloc", "addr": 3, "size": gib, "frames": _frames("recompute")},
        {"action": "free_completed", "addr": 2, "size": 2 * gib},
        {"action": "free_completed", "addr": 3, "size": gib},
        {"action": "alloc", "addr": 4, "size": gib, "frames": _frames("logits")},  # after the peak: not in it
    ]
    weights = {"device": 0, "blocks": [{"size": 5 * gib, "state": "active_allocated"},
                                       {"size": 2 * gib, "state": "active_allocated"},  # = blocks 1 and 4, still live
                                       {"size": gib, "state": "inactive"}]}
    report = live_at_peak({"device_traces": [events], "segments": [weights]})
    head, _, *rows = report.splitlines()[:6]
    assert "peak over recording 4.000 GiB at event 2" in head and "before recording (still live at the end) 5.000" in head
    assert "peak total about 9.000 GiB" in head
    assert rows[1].split()[:2] == ["3.000", "2"] and "recompute.py:7 recompute" in rows[1]  # torch's frame skipped
    assert rows[2].split()[:2] == ["1.000", "1"] and "chain" in rows[2]
    assert "logits" not in report and "graph.py" not in report


def test_live_at_peak_with_an_empty_trace():
    assert "events 0; peak over recording 0.000 GiB" in live_at_peak({"device_traces": [], "segments": []})
