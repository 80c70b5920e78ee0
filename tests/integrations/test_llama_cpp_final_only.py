"""`so8t_hf.integrations.llama_cpp.FinalOnlyLlama` on a stand-in of `llama_cpp.Llama` that returns canned
generations (clean, disguised, truncated; whole and as streamed chunks): the raw output shows the thinking,
the wrapped one the final only, never a thinking word, withheld finals as "" with `content_filter`."""

import pytest

from so8t_hf.integrations.llama_cpp import FinalOnlyLlama, load_final_only
from so8t_hf.thinking.format import TURN_END_TOKENS, read_final

SECRET = "SECRETPLAN"
CLEAN = (f"<think-task>{SECRET} step one</think-task>\n<think-safety>safe</think-safety>\n"
         "<think-policy>answer</think-policy>\n<final>Paris is the capital.</final>")
DISGUISED = f"<think-task>ok</think-task>\n<final>Paris <thіnk-task>{SECRET}</thіnk-task> end</final>"  # Cyrillic і
UNTERMINATED = f"<think-task>{SECRET} and it never ends"
CUT_IN_FINAL = "<think-task>t</think-task>\n<think-safety>s</think-safety>\n<think-policy>p</think-policy>\n<final>Par"
NO_TAGS = f"{SECRET} just prose"
TEXTS = {"clean": CLEAN, "disguised": DISGUISED, "unterminated": UNTERMINATED, "cut_in_final": CUT_IN_FINAL,
         "no_tags": NO_TAGS}
SURE = {"clean": ("Paris is the capital.", "final"), "disguised": ("", "withheld"), "unterminated": ("", None),
        "no_tags": ("", None)}  # what any reading of the format must give (None: either empty outcome)


def expected(name):
    """(content, outcome, finish_reason): the project's reading of the text, checked against `SURE`."""
    reading = read_final(TEXTS[name])
    if name in SURE:
        content, outcome = SURE[name]
        assert reading.final == content and outcome in (None, reading.status)
    finish = "content_filter" if reading.status == "withheld" else finish_of(TEXTS[name])
    return reading.final, reading.status, finish


def pieces(text, size=3):
    return [text[i:i + size] for i in range(0, len(text), size)]


class FakeLlama:
    """Answers like `llama_cpp.Llama` (OpenAI-shaped dicts, chunks when streaming) with a canned text."""

    def __init__(self, text, finish="stop"):
        self.text, self.finish, self.calls = text, finish, []
        self.metadata = {"general.architecture": "phi3"}

    def create_chat_completion(self, messages, stream=False, **kwargs):
        self.calls.append(("chat", messages, stream, kwargs))
        if not stream:
            return {"id": "c1", "object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": self.text}, "logprobs": None,
                 "finish_reason": self.finish}], "usage": {"completion_tokens": 42}}
        return self._chunks(chat=True)

    def create_completion(self, prompt, stream=False, **kwargs):
        self.calls.append(("completion", prompt, stream, kwargs))
        if not stream:
            return {"id": "t1", "object": "text_completion", "choices": [
                {"index": 0, "text": self.text, "logprobs": None, "finish_reason": self.finish}]}
        return self._chunks(chat=False)

    def _chunks(self, chat):
        if chat:
            yield {"id": "c1", "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}
        for piece in pieces(self.text):
            body = {"delta": {"content": piece}} if chat else {"text": piece}
            yield {"id": "c1", "choices": [{"index": 0, **body, "logprobs": None, "finish_reason": None}]}
        yield {"id": "c1", "choices": [{"index": 0, **({"delta": {}} if chat else {"text": ""}), "logprobs": None,
                                        "finish_reason": self.finish}]}


def finish_of(text):
    return "length" if text in (CUT_IN_FINAL, UNTERMINATED) else "stop"


def test_a_raw_chat_shows_the_thinking():
    raw = FakeLlama(CLEAN).create_chat_completion([{"role": "user", "content": "Capital of France?"}])
    assert SECRET in raw["choices"][0]["message"]["content"]  # what llama-cli / llama-server print as it is


@pytest.mark.parametrize("name", list(TEXTS))
def test_whole_chat_and_completion_show_the_final_only(name):
    text, (content, outcome, finish) = TEXTS[name], expected(name)
    llm = FinalOnlyLlama(FakeLlama(text, finish_of(text)))
    chat = llm.create_chat_completion([{"role": "user", "content": "q"}], temperature=0)["choices"][0]
    assert (chat["message"]["content"], chat["outcome"], chat["finish_reason"]) == (content, outcome, finish)
    completion = llm.create_completion("<|user|>\nq<|end|>\n<|assistant|>\n")["choices"][0]
    assert (completion["text"], completion["outcome"], completion["finish_reason"]) == (content, outcome, finish)
    assert SECRET not in repr(chat) + repr(completion)


@pytest.mark.parametrize("name", list(TEXTS))
def test_streamed_chat_and_completion_show_the_final_only(name):
    text, (content, outcome, finish) = TEXTS[name], expected(name)
    llm = FinalOnlyLlama(FakeLlama(text, finish_of(text)))
    chunks = list(llm.create_chat_completion([{"role": "user", "content": "q"}], stream=True))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    last = chunks[-1]["choices"][0]
    assert (last["outcome"], last["finish_reason"]) == (outcome, finish)
    texts = list(llm.create_completion("prompt", stream=True))
    completed = "".join(c["choices"][0]["text"] for c in texts)
    if outcome == "withheld":  # the stream may have shown the first words of the final, never the thinking
        assert read_final(text).draft.lstrip().startswith(streamed) and streamed == completed
    else:
        assert streamed == completed == content
    assert texts[-1]["choices"][0]["finish_reason"] == finish
    assert SECRET not in repr(chunks) + repr(texts) and "<" not in streamed


def test_a_stream_withheld_at_its_end_stops_without_thinking_text():
    text = "<think-task>t</think-task>\n<final>The answer is 4, see <think-task>" + SECRET + "</think-task></final>"
    chunks = list(FinalOnlyLlama(FakeLlama(text)).create_chat_completion([], stream=True))
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert "The answer is 4".startswith(streamed) or streamed.startswith("The answer is 4")
    assert SECRET not in repr(chunks) and "think" not in streamed
    assert chunks[-1]["choices"][0]["finish_reason"] == "content_filter"


def test_turn_end_stops_are_added_and_logprobs_refused():
    fake = FakeLlama(CLEAN)
    FinalOnlyLlama(fake).create_chat_completion([], stop="###", max_tokens=8)
    kwargs = fake.calls[-1][3]
    assert kwargs["stop"][0] == "###" and set(TURN_END_TOKENS) <= set(kwargs["stop"]) and kwargs["max_tokens"] == 8
    with pytest.raises(ValueError, match="logprobs would show the thinking"):
        FinalOnlyLlama(fake).create_completion("p", logprobs=5)
    assert FinalOnlyLlama(fake).metadata["general.architecture"] == "phi3"  # the rest is the wrapped Llama's


def test_load_final_only_names_the_missing_package(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(ImportError, match="pip install llama-cpp-python"):
        load_final_only("model.gguf")
