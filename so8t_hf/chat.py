"""`so8t-hf chat`: talk to a thinking model; only the `<final>` answer is shown unless --show-thinking."""

from __future__ import annotations

import argparse
import sys

from .thinking import extract_final


def load_chat_model(path: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=dtype)
    model = model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    return model, AutoTokenizer.from_pretrained(path)


def reply(model, tokenizer, history, args) -> str:
    from .generation import generate_reply

    text, _, _ = generate_reply(model, tokenizer, history, args.max_new_tokens, args.temperature, args.top_p)
    return text if args.show_thinking else extract_final(text)


def cmd_chat(args: argparse.Namespace) -> int:
    model, tokenizer = load_chat_model(args.model)
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
    chat.add_argument("--model", required=True, help="model dir (e.g. outputs/demo/final); loads with remote code")
    chat.add_argument("--prompt", help="answer this one message and exit (default: interactive on stdin)")
    chat.add_argument("--system", help="system message")
    chat.add_argument("--show-thinking", action="store_true", help="print the raw generation with its thinking (developers)")
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    chat.add_argument("--top-p", type=float, default=1.0)
    chat.set_defaults(func=cmd_chat)
