"""`so8t-hf chat`: talk to a thinking model; only the `<final>` answer is shown unless --show-thinking.

The answer is read with the positive grammar (`thinking.format.read_final`): a generation that does not parse
as sections + one clean final shows "(no final answer: REASON)" with the grammar's reason code."""

from __future__ import annotations

import argparse
import sys

from so8t_hf.inference.loader import DTYPE_NAMES
from so8t_hf.thinking.format import read_final


def reply(model, tokenizer, history, args) -> str:
    from so8t_hf.inference.generation import _model_tags, generate_reply

    text, _, _ = generate_reply(model, tokenizer, history, args.max_new_tokens, args.temperature, args.top_p)
    if args.show_thinking:
        return text
    reading = read_final(text, _model_tags(model))
    if not reading.final:
        print(f"(no final answer: {reading.reason})", file=sys.stderr)
    return reading.final


def cmd_chat(args: argparse.Namespace) -> int:
    from so8t_hf.inference.loader import load_for_inference

    try:
        model, tokenizer = load_for_inference(args.model, dtype=args.dtype)
    except (OSError, ValueError) as err:  # a folder that is no model, an adapter without a reachable base: one line
        raise SystemExit(f"so8t-hf chat: cannot load {args.model}: {' '.join(str(err).split())}") from None
    history = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:  # one-shot
        print(reply(model, tokenizer, history + [{"role": "user", "content": args.prompt}], args) or "(no final answer)")
        return 0
    print("so8t-hf chat: empty line or Ctrl-D to quit", file=sys.stderr)
    for line in sys.stdin:
        if not line.strip():
            break
        history.append({"role": "user", "content": line.strip()})
        answer = reply(model, tokenizer, history, args)
        print(answer or "(no final answer)", flush=True)
        history.append({"role": "assistant", "content": answer})
    return 0


def add_subparser(subparsers) -> None:
    chat = subparsers.add_parser("chat", help="chat with a model, showing final answers only")
    chat.add_argument("--model", required=True, help="model dir (e.g. outputs/demo/final; loads with remote code), or "
                                                     "a run's adapter/ dir (its base with the adapter merged in)")
    chat.add_argument("--prompt", help="answer this one message and exit (default: interactive on stdin)")
    chat.add_argument("--system", help="system message")
    chat.add_argument("--show-thinking", action="store_true", help="print the raw generation with its thinking (developers)")
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    chat.add_argument("--top-p", type=float, default=1.0)
    chat.add_argument("--dtype", default="auto", choices=DTYPE_NAMES,
                      help="weights dtype; auto = bfloat16 on a GPU that supports it, else float32")
    chat.set_defaults(func=cmd_chat)
