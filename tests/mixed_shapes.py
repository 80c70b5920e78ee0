"""A small dataset folder holding every row shape the loader accepts, written as the ecosystem writes them:
`json.dumps(ensure_ascii=False)` (raw U+2028 / U+2029 / U+0085 inside strings), a gzip-compressed JSON Lines
file in a subfolder, a Parquet file (nulls where a message has no `reasoning_content`), and a file that is not
data. `write_mixed_dataset(folder)` returns the expected counts."""

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

TAGGED = ("<think-task>Add.</think-task>\n<think-safety>Harmless.</think-safety>\n<think-policy>Short."
          "</think-policy>\n<final>{answer}</final>")
SEPARATORS = "\u2028\u2029\u0085"  # str.splitlines breaks on these; JSON Lines does not


def _rows(i: int) -> list[dict]:
    a, b = i, i + 1
    q = f"What is {a} + {b}?"
    ans = str(a + b)
    return [
        {"instruction": q, "thinking": {"task": f"Add {a} and {b}.", "safety": "Harmless.", "policy": "Number."},
         "final": ans},
        {"instruction": q, "input": "", "output": TAGGED.format(answer=ans)},
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": TAGGED.format(answer=ans)}]},
        {"messages": [{"role": "user", "content": q},
                      {"role": "assistant", "content": ans, "reasoning_content": f"{a} plus {b}\u2028is {ans}."}]},
        {"messages": [{"role": "user", "content": q},
                      {"role": "assistant", "content": f"<think>\n{a}\u2029+ {b}.\n</think>\n\n{ans}"}]},
        {"prompt": [{"role": "user", "content": q}],
         "completion": [{"role": "assistant", "content": f"The sum\u0085is {ans}.", "reasoning_content": "Add."}]},
        {"prompt": q, "completion": f"{a} + {b}</think>{ans}"},  # plain TRL row, R1 output without <think>
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                      {"role": "user", "content": q},
                      {"role": "assistant", "content": ans, "thinking": "Earlier turn was plain; add."}]},
    ]


SHAPES_PER_BLOCK = {"structured": 1, "output": 1, "chat": 4, "prompt_completion": 2}


def write_mixed_dataset(folder: Path, blocks: int = 3) -> dict:
    """Write the folder; return {"rows": n, "shapes": {shape: n}, "skipped": [paths]}."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r, ensure_ascii=False) for i in range(blocks) for r in _rows(i)]
    assert all(any(c in line for c in SEPARATORS) for line in lines[3:6])
    (folder / "mixed.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "more").mkdir(exist_ok=True)
    gz = [json.dumps(r, ensure_ascii=False) for r in _rows(10)[3:5]]
    (folder / "more" / "extra.jsonl.gz").write_bytes(gzip.compress(("\n".join(gz) + "\n").encode("utf-8")))
    chats = [r for r in _rows(20) if "messages" in r][1:3]  # reasoning_content / <think> chats
    pq.write_table(pa.Table.from_pylist(chats), folder / "chats.parquet")
    (folder / "README.txt").write_text("not data\n", encoding="utf-8")
    shapes = {k: v * blocks for k, v in SHAPES_PER_BLOCK.items()}
    shapes["chat"] += 4
    return {"rows": 8 * blocks + 4, "shapes": dict(sorted(shapes.items())), "skipped": [str(folder / "README.txt")]}
