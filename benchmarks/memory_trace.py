"""What is live at a run's CUDA memory peak, from `torch.cuda.memory._snapshot()` taken with the allocation history
on (`_record_memory_history(stacks="python")`): the trace is replayed to the moment allocated bytes were highest,
and the blocks live then are grouped by where they were allocated (the innermost frames outside torch's own files).
Blocks allocated before recording started (the weights) are counted as one `before recording` line."""

from __future__ import annotations

from collections import defaultdict

_SKIP = ("/torch/", "<frozen", "/contextlib.py", "/functools.py", "memory_trace.py")


def _site(frames: list[dict], depth: int = 3) -> str:
    own = [f for f in frames if not any(s in f.get("filename", "") for s in _SKIP)]
    picked = (own or frames)[:depth]
    return " < ".join(f"{f['filename'].rsplit('/', 2)[-1]}:{f['line']} {f['name']}" for f in picked) or "?"


def live_at_peak(snapshot: dict, device: int = 0, top: int = 25) -> str:
    """A text report: the peak, the step of the trace it fell in, and the largest allocation sites live then."""
    traces = snapshot.get("device_traces") or []
    events = traces[device] if device < len(traces) else []
    before = sum(b["size"] for seg in snapshot.get("segments", []) if seg.get("device", device) == device
                 for b in seg.get("blocks", []) if b.get("state") == "active_allocated")
    live: dict[int, tuple[int, str]] = {}
    current = peak = 0
    peak_live: dict[int, tuple[int, str]] = {}
    peak_index = 0
    for index, event in enumerate(events):
        action, addr, size = event.get("action"), event.get("addr"), event.get("size", 0)
        if action == "alloc":
            live[addr] = (size, _site(event.get("frames", [])))
            current += size
            if current > peak:
                peak, peak_index, peak_live = current, index, dict(live)
        elif action in ("free_completed",) and addr in live:
            current -= live.pop(addr)[0]
    end_live = sum(size for size, _ in live.values())
    untracked = max(before - end_live, 0)  # allocated before recording, still live at the end (weights, states)
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for size, site in peak_live.values():
        groups[site][0] += size
        groups[site][1] += 1
    gib = 2**30
    lines = [f"events {len(events)}; peak over recording {peak / gib:.3f} GiB at event {peak_index}; "
             f"allocated before recording (still live at the end) {untracked / gib:.3f} GiB; "
             f"peak total about {(peak + untracked) / gib:.3f} GiB", "", "GiB      blocks  site (innermost first)"]
    for site, (size, count) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"{size / gib:7.3f}  {count:6d}  {site}")
    return "\n".join(lines) + "\n"
