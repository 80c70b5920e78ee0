"""What is live at a run's CUDA memory peak, from `torch.cuda.memory._snapshot()` taken with the allocation history
on (`_record_memory_history(stacks="python")`): the trace is replayed to the moment allocated bytes were highest,
and the blocks live then are grouped by where they were allocated (the innermost frames outside torch's own files).
Blocks allocated before recording started (the weights) are one figure of the report's first line."""

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

    def replay(stop: int) -> tuple[dict[int, tuple[int, int]], int, int]:
        """The blocks live after event `stop` (address -> size, allocating event), and the highest total (and its
        event) up to there."""
        live: dict[int, tuple[int, int]] = {}
        current = peak = peak_index = 0
        for index, event in enumerate(events[: stop + 1]):
            action, addr = event.get("action"), event.get("addr")
            if action == "alloc":
                live[addr] = (event.get("size", 0), index)
                current += live[addr][0]
                if current > peak:
                    peak, peak_index = current, index
            elif action == "free_completed" and addr in live:
                current -= live.pop(addr)[0]
        return live, peak, peak_index

    end_live, peak, peak_index = replay(len(events) - 1)
    peak_live = replay(peak_index)[0]  # a second pass to the peak: no copy of the live set at every new high
    untracked = max(before - sum(size for size, _ in end_live.values()), 0)  # before recording, live at the end
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for size, index in peak_live.values():
        site = _site(events[index].get("frames", []))
        groups[site][0] += size
        groups[site][1] += 1
    gib = 2**30
    lines = [f"events {len(events)}; peak over recording {peak / gib:.3f} GiB at event {peak_index}; "
             f"allocated before recording (still live at the end) {untracked / gib:.3f} GiB; "
             f"peak total about {(peak + untracked) / gib:.3f} GiB", "", "GiB      blocks  site (innermost first)"]
    for site, (size, count) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"{size / gib:7.3f}  {count:6d}  {site}")
    return "\n".join(lines) + "\n"
