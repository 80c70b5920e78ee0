"""Version shims: what differs between the transformers / torch versions the library supports
(transformers 5.17 on the GPU image up to 5.2x on CI; torch 2.11 to 2.13)."""

from __future__ import annotations

import dataclasses

from transformers import TrainingArguments

# Newer transformers name it activation_checkpointing(_kwargs), gradient_checkpointing(_kwargs) being
# deprecated aliases; older ones (5.17) have only the gradient_checkpointing names.
HF_HAS_ACTIVATION_CHECKPOINTING_NAMES = "activation_checkpointing_kwargs" in {
    f.name for f in dataclasses.fields(TrainingArguments)
}
