"""A `streamer=` given to the final-only pipeline or to `generate_reply` receives the final alone, at the end:
real TextStreamer / TextIteratorStreamer on a scripted tiny model whose generation holds a secret in thinking
(tests/serve/serve_helpers.py), at every length cut. Unwrapped, the same streamer prints the secret."""

import sys

import pytest
import torch
from paths import PHI35_TOKENIZER, REPO
from transformers import AutoTokenizer, TextIteratorStreamer, TextStreamer

sys.path.insert(0, str(REPO / "tests" / "serve"))
from serve_helpers import SECRET, build_demo_model  # noqa: E402

from so8t_hf.inference.generation import generate_reply  # noqa: E402
from so8t_hf.modeling import So8tPhi3ForCausalLM  # noqa: E402
from so8t_hf.thinking.grammar import STREAMING_API  # noqa: E402
from so8t_hf.thinking.pipeline import So8tThinkingPipeline  # noqa: E402

SCRIPTS = {
    "clean": [("tok", "<think-task>"), ("text", f"{SECRET} plan"), ("tok", "</think-task>"), ("tok", "<final>"),
              ("text", "Four."), ("tok", "</final>"), ("tok", "<|end|>")],
    "disguised": [("tok", "<think-task>"), ("text", "plan"), ("tok", "</think-task>"), ("tok", "<final>"),
                  ("text", f"ok [think]{SECRET}"), ("tok", "</final>"), ("tok", "<|end|>")],
    "draft": [("tok", "<think-task>"), ("text", f"{SECRET} draft"), ("tok", "<final>"), ("text", "Four."),
              ("tok", "</final>"), ("tok", "<|end|>")],
}


@pytest.fixture(scope="module", params=list(SCRIPTS))
def demo(request, tmp_path_factory):
    if not (PHI35_TOKENIZER / "tokenizer.json").is_file():
        pytest.skip("no Phi-3.5 tokenizer fixture")
    demo = build_demo_model(tmp_path_factory.mktemp(request.param), SCRIPTS[request.param])
    model = So8tPhi3ForCausalLM.from_pretrained(demo.path).eval()
    return request.param, demo, model, AutoTokenizer.from_pretrained(demo.path)


def test_streamers_receive_the_final_only_at_every_length(demo, capsys):
    name, script, model, tok = demo
    pipe = So8tThinkingPipeline(model=model, tokenizer=tok, task="text-generation")
    tries = 0
    n = len(script.script)
    lengths = sorted({1, 2, n // 3, n // 2, n - 3, n - 2, n - 1, n})  # cut in the thinking, the final, at its end
    for k in lengths:
        it = TextIteratorStreamer(tok)
        chat = [{"role": "user", "content": "q"}]
        out = pipe(chat, max_new_tokens=k, do_sample=False, streamer=it)[0]["generated_text"][-1]["content"]
        streamed = "".join(it)
        printer = TextStreamer(tok)
        capsys.readouterr()
        text, _, _ = generate_reply(model, tok, [{"role": "user", "content": "q"}], max_new_tokens=k, streamer=printer)
        printed = capsys.readouterr().out
        for seen in (streamed, printed):
            assert SECRET not in seen and "<" not in seen and "[" not in seen, (name, k, seen)
        assert streamed == out and printed.strip() == out, (name, k, streamed, printed, out)
        tries += 1
    expected = "Four." if name == "clean" else ""
    assert out == expected and tries == len(lengths)


def test_unwrapped_streamer_would_show_the_thinking_and_others_are_refused(demo, capsys):
    name, script, model, tok = demo
    if name != "clean":
        pytest.skip("one script is enough")
    ids = torch.tensor([tok.encode("<|user|>\nq<|end|>\n<|assistant|>\n", add_special_tokens=False)])
    model.generate(input_ids=ids, max_new_tokens=20, do_sample=False, streamer=TextStreamer(tok, skip_prompt=True))
    assert SECRET in capsys.readouterr().out  # what the wrapper prevents: model.generate is the raw path

    class Raw:
        def put(self, value): ...
        def end(self): ...

    pipe = So8tThinkingPipeline(model=model, tokenizer=tok, task="text-generation")
    with pytest.raises(TypeError, match="so8t-hf serve") as err:
        pipe("q", max_new_tokens=4, streamer=Raw())
    assert STREAMING_API in str(err.value)
