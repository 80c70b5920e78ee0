"""Generated reasoning rows for the end-to-end training benchmark: chat `messages` in the thinking format
(`<think-task>`, `<think-safety>`, `<think-policy>`, `<final>`), 100-600 tokens each with the Phi-3.5 tokenizer,
deterministic for a seed. Plain English words in sentences, so tokenisation behaves like real text (not random ids).

    python benchmarks/reasoning_rows.py --rows 1300 --out /tmp/rows.jsonl
"""

from __future__ import annotations

import argparse
import json
import random

WORDS = (
    "the a of to and in is it that for on with as this be are by from at or an not we can which have if will "
    "value number answer question result step first second then next because so therefore total each part "
    "check compare order time distance speed price cost rate percent half third double sum difference product "
    "user asks about explain short clear example reason method simple careful assume given known unknown "
    "equation solve find compute measure estimate round convert unit metre kilometre hour minute second litre "
    "kilogram gram degree angle triangle circle area volume length width height side point line count list "
    "history city country river mountain language word sentence summary meaning source fact claim evidence "
    "safe risk harm nothing sensitive neutral request plain topic advice general policy format brief direct "
    "mention include avoid detail keep drop add state give show write one two three four five ten hundred "
    "thousand water air energy light heat plant animal cell science school student teacher book library data"
).split()


def _sentence(rng: random.Random, n: int) -> str:
    words = [rng.choice(WORDS) for _ in range(max(n, 1))]
    if rng.random() < 0.3:
        words[rng.randrange(len(words))] = str(rng.randint(2, 9999))
    return " ".join(words).capitalize() + "."


def _text(rng: random.Random, n_words: int) -> str:
    out, left = [], n_words
    while left > 0:
        n = min(left, rng.randint(6, 18))
        out.append(_sentence(rng, n))
        left -= n
    return " ".join(out)


def make_rows(n: int, seed: int = 0) -> list[dict]:
    """`n` rows of {"messages": [user, assistant]}; about 1.3 Phi-3.5 tokens per word, 60-430 words per row."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        total = rng.randint(60, 430)
        question = max(6, int(total * rng.uniform(0.05, 0.15)))
        safety = rng.randint(5, 20)
        policy = rng.randint(5, 20)
        rest = max(10, total - question - safety - policy)
        task = max(5, int(rest * rng.uniform(0.4, 0.7)))
        final = max(5, rest - task)
        answer = (f"<think-task>{_text(rng, task)}</think-task>\n<think-safety>{_text(rng, safety)}</think-safety>\n"
                  f"<think-policy>{_text(rng, policy)}</think-policy>\n<final>{_text(rng, final)}</final>")
        rows.append({"messages": [{"role": "user", "content": _text(rng, question).rstrip(".") + "?"},
                                  {"role": "assistant", "content": answer}]})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    with open(args.out, "w") as f:
        for row in make_rows(args.rows, args.seed):
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
