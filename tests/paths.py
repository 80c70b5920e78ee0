"""Paths the tests share: the repository root and the real Phi-3.5 tokenizer fixture (`../shared/fixtures`,
or `SO8T_PHI35_TOKENIZER`)."""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHI35_TOKENIZER = Path(os.environ.get("SO8T_PHI35_TOKENIZER", REPO.parent / "shared" / "fixtures" / "phi35-tokenizer"))
