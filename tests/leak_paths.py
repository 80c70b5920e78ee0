"""Every delivery path of a generation, for the leak generator (`leak_classes`): what a user would see.

`paths(tokenizer, pipe)` -> {path name: function(case) -> shown text}. Paths: `extraction` (extract_final on the
text), `stream` (visible_final_prefix of every prefix at random chunk boundaries, then of the ended text),
`token ids` (grammar.read_ids on the real Phi-3.5 ids), `pipeline` (So8tThinkingPipeline.postprocess on those ids),
`streamer` (FinalOnlyStreamer over a real TextIteratorStreamer, ids in random chunks), `vllm` (the reasoning
parser's content, non-streaming and streaming deltas). `table(counts)` renders the per-class markdown table.
"""

from __future__ import annotations

import random
from collections import Counter

import torch

from so8t_hf.thinking import DEFAULT_TAGS, extract_final, visible_final_prefix
from so8t_hf.thinking.grammar import FinalOnlyStreamer, IdTable, read_ids

PATHS = ["extraction", "stream", "token ids", "pipeline", "streamer", "vllm"]


def _chunks(rng, n):
    cuts = sorted(rng.sample(range(1, n), min(n - 1, rng.randrange(1, 6)))) if n > 1 else []
    return list(zip([0, *cuts], [*cuts, n]))


def paths(tokenizer, pipe, seed: int = 0):
    from transformers import TextIteratorStreamer

    from so8t_hf.integrations.vllm_reasoning import So8tReasoning

    rng = random.Random(seed)
    table = IdTable.of(tokenizer, DEFAULT_TAGS)
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    vllm = So8tReasoning(tokenizer, DEFAULT_TAGS)

    def ids_of(text):
        return tokenizer.encode(text, add_special_tokens=False)

    def stream(case):
        text = case.text
        seen = [visible_final_prefix(text[:b]) for _, b in _chunks(rng, len(text) + 1)]
        return "".join(seen) + visible_final_prefix(text + "<|end|>")

    def pipeline(case):
        ids = ids_of(case.text) + [end]
        prompt = torch.tensor([[1, 2]])
        out = {"generated_sequence": torch.tensor([[[1, 2, *ids]]]), "input_ids": prompt, "prompt_text": "q"}
        from transformers.pipelines.text_generation import ReturnType

        return pipe.postprocess(out, return_type=ReturnType.NEW_TEXT)[0]["generated_text"]

    def streamer(case):
        inner = TextIteratorStreamer(tokenizer)
        wrapped = FinalOnlyStreamer(inner, table)
        ids = ids_of(case.text) + [end]
        wrapped.put(torch.tensor([[1, 2]]))
        for a, b in _chunks(rng, len(ids)):
            wrapped.put(torch.tensor(ids[a:b]))
        wrapped.end()
        return "".join(inner)

    def vllm_path(case):
        _, content = vllm.extract(case.text)
        ids = ids_of(case.text) + [end]
        streamed, prev = [], []
        for a, b in _chunks(rng, len(ids)):
            delta = ids[a:b]
            out = vllm.stream(tokenizer.decode(prev), tokenizer.decode(prev + delta), tokenizer.decode(delta), prev,
                              prev + delta, delta)
            prev = prev + delta
            if out is not None and out[1]:
                streamed.append(out[1])
        # the stream's content equals the non-streaming content (a mismatch shows both, so the checks see it)
        return content or "" if "".join(streamed) == (content or "") else f"{content}|{''.join(streamed)}"

    return {
        "extraction": lambda case: extract_final(case.text),
        "stream": stream,
        "token ids": lambda case: read_ids(ids_of(case.text) + [end], table).final,
        "pipeline": pipeline,
        "streamer": streamer,
        "vllm": vllm_path,
    }


def run(case_list, fns, leaked):
    """Counter keys: (class, path, "cases" | "leaks" | "shown")."""
    counts: Counter = Counter()
    for case in case_list:
        for path, fn in fns.items():
            shown = fn(case)
            counts[case.cls, path, "cases"] += 1
            counts[case.cls, path, "leaks"] += leaked(shown, case)
            counts[case.cls, path, "shown"] += bool(shown)
    return counts


def table(counts, paths_=None) -> str:
    paths_ = paths_ or sorted({p for _, p, _ in counts})
    classes = list(dict.fromkeys(c for c, _, _ in counts))
    head = "| class | " + " | ".join(f"{p} leaks/cases (shown)" for p in paths_) + " |"
    lines = [head, "|" + " --- |" * (len(paths_) + 1)]
    for c in classes:
        cells = [f"{counts[c, p, 'leaks']}/{counts[c, p, 'cases']} ({counts[c, p, 'shown']})" for p in paths_]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    total = [f"{sum(counts[c, p, 'leaks'] for c in classes)}/{sum(counts[c, p, 'cases'] for c in classes)} "
             f"({sum(counts[c, p, 'shown'] for c in classes)})" for p in paths_]
    lines.append("| **all** | " + " | ".join(total) + " |")
    return "\n".join(lines)
