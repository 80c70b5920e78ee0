"""PET regulariser: a smoothness penalty on the last hidden states along the sequence.

`lambda(phase) * mean over valid t of ||h[t+2] - 2 h[t+1] + h[t]||^2`, where a position triple is valid
only when all three are real tokens of one sequence: no padding (`attention_mask`) and no crossing of a
packed-sequence boundary (`position_ids` must step by exactly 1). `lambda` follows a three-phase schedule
over training progress (explore with a small weight, then tighten).
"""

from __future__ import annotations

import bisect

import torch


def pet_lambda_at(progress: float, base: float, boundaries=(0.3, 0.7), scales=(0.1, 0.5, 1.0)) -> float:
    """`base * scales[phase]`, phase = where `progress` in [0, 1] falls among `boundaries`."""
    if len(scales) != len(boundaries) + 1:
        raise ValueError(f"pet_phase_scales needs {len(boundaries) + 1} values for {len(boundaries)} boundaries")
    return base * scales[bisect.bisect_right(list(boundaries), progress)]


def pet_penalty(hidden: torch.Tensor, attention_mask=None, position_ids=None) -> torch.Tensor:
    """Mean squared second difference of `hidden` (B, T, H) over valid position triples (a 0-dim fp32 tensor)."""
    if hidden.shape[1] < 3:
        return hidden.new_zeros((), dtype=torch.float32)
    second = hidden[:, 2:] - 2 * hidden[:, 1:-1] + hidden[:, :-2]  # (B, T-2, H)
    valid = torch.ones(second.shape[:2], dtype=torch.bool, device=hidden.device)
    if attention_mask is not None:
        real = attention_mask.bool()
        valid &= real[:, 2:] & real[:, 1:-1] & real[:, :-2]
    if position_ids is not None:
        pos = position_ids.expand(hidden.shape[0], -1)
        valid &= (pos[:, 1:-1] == pos[:, :-2] + 1) & (pos[:, 2:] == pos[:, :-2] + 2)
    squared = second.float().pow(2).sum(-1)  # (B, T-2)
    return (squared * valid).sum() / valid.sum().clamp(min=1)
