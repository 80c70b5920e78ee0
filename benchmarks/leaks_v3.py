"""The leak table of the positive grammar (issue 20): every attack class of `tests/leak_classes.py` on every path.

Paths: extraction, stream prefixes, real Phi-3.5 token ids, the Hub pipeline, a TextIteratorStreamer, the vLLM
parser (`tests/leak_paths.py`), and the four HTTP routes of `so8t-hf serve` (the echo-model server of
`tests/serve/test_serve_leaks.py`, over loopback). Each cell: leaks / cases (cases whose final was shown; only
the `in_section` position, where the marker sits inside a closed thinking section, should be shown).

    PYTHONPATH=$PWD python benchmarks/leaks_v3.py --out benchmarks/results/leaks_v3.md [--before-src DIR]

`--before-src DIR`: also run the same generations through `extract_final` of another checkout (e.g. the code
before the grammar, `git archive 3813ad7 | tar -x -C DIR`), in a subprocess, for a before/after column.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import random
import socket
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "serve")]


def echo_server(tmp: Path):
    import httpx
    import uvicorn
    from test_serve_leaks import SECRET_KEY, CharTokenizer, EchoModel

    from so8t_hf.serve.app import ServeSettings, create_app
    from so8t_hf.serve.audit import AuditLog
    from so8t_hf.serve.auth import KeyStore
    from so8t_hf.serve.engine import GenerationEngine

    settings = ServeSettings(max_new_tokens_cap=4096, default_max_new_tokens=4096, max_body_bytes=1 << 20,
                             max_input_tokens=4096)
    app = create_app(GenerationEngine(EchoModel(), CharTokenizer(), max_queue=64), KeyStore([f"t:{SECRET_KEY}"]),
                     AuditLog.open(tmp / "audit.db"), settings)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True).start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    for _ in range(200):
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.05)
    return server, httpx.Client(base_url=url, headers={"Authorization": f"Bearer {SECRET_KEY}"}, timeout=60)


_BEFORE = """
import json, random, sys
sys.path.insert(0, sys.argv[1])
import so8t_hf
from so8t_hf.thinking import extract_final
from leak_classes import cases, leaked
out = {}
for c in cases(random.Random(int(sys.argv[2])), per_class=int(sys.argv[3])):
    out.setdefault(c.cls, 0)
    out[c.cls] += leaked(extract_final(c.text), c)
print(json.dumps({"file": so8t_hf.__file__, "leaks": out}))
"""


def before(src: str, seed: int, per_class: int) -> dict:
    import json
    import os
    import subprocess

    env = {**os.environ, "PYTHONPATH": src}
    res = subprocess.run([sys.executable, "-c", _BEFORE, str(REPO / "tests"), str(seed), str(per_class)], env=env,
                         capture_output=True, text=True, check=True, cwd=src)
    data = json.loads(res.stdout.strip().splitlines()[-1])
    assert data["file"].startswith(str(Path(src).resolve())), data["file"]
    return data["leaks"]


def main() -> None:
    import tempfile
    from collections import Counter

    import transformers
    from leak_classes import CLASSES, STRUCTURAL, cases, leaked
    from leak_paths import PATHS, paths, run, table
    from paths import PHI35_TOKENIZER
    from test_serve_leaks import HTTP_PATHS, http_paths
    from tiny_models import tiny_so8t
    from transformers import AutoTokenizer

    from so8t_hf.thinking.chat_template import add_thinking_tokens
    from so8t_hf.thinking.pipeline import So8tThinkingPipeline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/leaks_v3.md")
    parser.add_argument("--per-class", type=int, default=3, help="cases per class and position")
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--before-src", help="another checkout whose extract_final gives a 'before' column")
    parser.add_argument("--before-label", help="how the table names that checkout (default: its path)")
    args = parser.parse_args()

    tok = AutoTokenizer.from_pretrained(PHI35_TOKENIZER)
    add_thinking_tokens(tok)
    pipe = So8tThinkingPipeline(model=tiny_so8t(0, vocab_size=32064, pad_token_id=32000, eos_token_id=32007),
                                tokenizer=tok, task="text-generation")
    case_list = cases(random.Random(args.seed), per_class=args.per_class)
    t0 = time.perf_counter()
    counts = run(case_list, paths(tok, pipe, seed=args.seed), leaked)
    with tempfile.TemporaryDirectory() as tmp:
        server, client = echo_server(Path(tmp))
        counts += run(case_list, http_paths(client), leaked)
        client.close()
        server.should_exit = True
    seconds = time.perf_counter() - t0
    all_paths = [*PATHS, *HTTP_PATHS]
    leaks = sum(counts[c, p, "leaks"] for c in {*CLASSES, *STRUCTURAL} for p in all_paths)
    positions = sorted({c.position for c in case_list})
    text = "\n".join([
        "# Leak table of the positive grammar (issue 20)", "",
        f"Command: `PYTHONPATH=$PWD python benchmarks/leaks_v3.py --per-class {args.per_class} --seed {args.seed}"
        + (f" --before-src DIR --before-label '{args.before_label}'" if args.before_src else "") + "`  ",
        f"Machine: CPU ({platform.machine()}), Python {platform.python_version()}, transformers "
        f"{transformers.__version__}; {seconds:.0f} s. Tokenizer: the real Phi-3.5 tokenizer with the tags added.",
        "",
        f"{len(CLASSES) + len(STRUCTURAL)} classes ({len(CLASSES)} spellings of a tag, {len(STRUCTURAL)} structural), "
        f"{len(case_list)} generations, positions {', '.join(positions)}; {len(all_paths)} paths. "
        f"**{leaks} leaks in {sum(counts[c, p, 'cases'] for c in {*CLASSES, *STRUCTURAL} for p in all_paths)} "
        "deliveries.** A leak: the secret or the marker's own spelling in what the user of that path sees.",
        "Cell: leaks/cases (finals shown). Shown finals are the `in_section` cases (marker inside a closed thinking "
        "section: the clean final is delivered) and the clean structural ones. On the HTTP routes the `after_final` "
        "cases are shown too: the engine stops generating at the final's closing tag, so what follows it (the "
        "marker and the secret) is never generated, and the final before it is clean.", "",
        table(counts, PATHS), "", table(counts, HTTP_PATHS), "",
    ])
    if args.before_src:
        old = before(args.before_src, args.seed, args.per_class)
        n = Counter(c.cls for c in case_list)
        rows = [f"| {c} | {old.get(c, 0)}/{n[c]} | {counts[c, 'extraction', 'leaks']}/{n[c]} |" for c in n]
        text += "\n".join([
            f"Before / after on the extraction path: `extract_final` of {args.before_label or args.before_src} "
            "(the lexer-based reader) "
            f"vs this one, same generations: {sum(old.values())} vs "
            f"{sum(counts[c, 'extraction', 'leaks'] for c in n)} leaking generations of {len(case_list)}; "
            f"{sum(1 for v in old.values() if v)} of {len(n)} classes leaked before.", "",
            "| class | before | after |", "| --- | --- | --- |", *rows, ""])
    Path(args.out).write_text(text, encoding="utf-8")
    print(text)
    if leaks:
        raise SystemExit(f"{leaks} leaks")


if __name__ == "__main__":
    main()
