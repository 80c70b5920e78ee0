"""Test session set-up and shared fixtures.

CPU runs use Triton's interpreter, so the kernels are tested without a GPU; nothing touches the Hub. Helper
modules beside this file: `tiny_models` (tiny random Phi-3 / SO8T-Phi3, tokenizer, token datasets),
`isolation` (a process that cannot import so8t_hf), `paths` (the repository and the Phi-3.5 tokenizer fixture).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first `import triton`
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from paths import PHI35_TOKENIZER, REPO  # noqa: E402


@pytest.fixture(scope="session")
def repo_root():
    return REPO


@pytest.fixture(scope="session")
def phi35_tokenizer_dir():
    """The real Phi-3.5-mini tokenizer fixture (skips the test where it is missing)."""
    if not (PHI35_TOKENIZER / "tokenizer.json").is_file():
        pytest.skip(f"real Phi-3.5 tokenizer fixture not found at {PHI35_TOKENIZER} (set SO8T_PHI35_TOKENIZER)")
    return PHI35_TOKENIZER


@pytest.fixture
def tiny_so8t_model():
    """A fresh tiny random SO8T-Phi3 (2 layers, hidden 64, GQA 4/2) in eval mode."""
    from tiny_models import tiny_so8t

    return tiny_so8t()
