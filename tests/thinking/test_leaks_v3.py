"""The positive grammar against the issue-20 attack classes (`leak_classes`: 44 classes, 5 positions each) on
every non-HTTP delivery path (`leak_paths`): extraction, stream prefixes, real Phi-3.5 token ids, the Hub
pipeline, a real TextIteratorStreamer, the vLLM parser. 0 leaks; clean finals (a marker hidden in a section)
are still shown. The HTTP routes run the same generator in tests/serve/test_serve_leaks.py."""

import random

import pytest
from leak_classes import CLASSES, STRUCTURAL, cases, leaked
from leak_paths import PATHS, paths, run, table
from paths import PHI35_TOKENIZER
from transformers import AutoTokenizer

from so8t_hf.thinking.chat_template import add_thinking_tokens


@pytest.fixture(scope="module")
def tokenizer():
    if not (PHI35_TOKENIZER / "tokenizer.json").is_file():
        pytest.skip(f"real Phi-3.5 tokenizer fixture not found at {PHI35_TOKENIZER}")
    tok = AutoTokenizer.from_pretrained(PHI35_TOKENIZER)
    add_thinking_tokens(tok)
    return tok


@pytest.fixture(scope="module")
def pipe(tokenizer):
    from tiny_models import tiny_so8t

    from so8t_hf.thinking.pipeline import So8tThinkingPipeline

    model = tiny_so8t(0, vocab_size=32064, pad_token_id=32000, eos_token_id=32007)
    return So8tThinkingPipeline(model=model, tokenizer=tokenizer, task="text-generation")


def test_no_class_leaks_on_any_path(tokenizer, pipe):
    case_list = cases(random.Random(2020), per_class=2)
    counts = run(case_list, paths(tokenizer, pipe, seed=20), leaked)
    print("\n" + table(counts, PATHS))
    classes = [*CLASSES, *STRUCTURAL]
    assert len(classes) >= 40 and {c.cls for c in case_list} == set(classes)
    for path in PATHS:
        assert sum(counts[c, path, "leaks"] for c in classes) == 0, (path, table(counts, [path]))
    # liveness: a marker hidden inside a closed section leaves the clean final shown, on every path
    live = [c for c in case_list if c.shown]
    for path, fn in paths(tokenizer, pipe, seed=21).items():
        shown = sum(fn(c) == "The answer is 42." for c in live)
        assert shown >= 0.9 * len(live), (path, shown, len(live))
