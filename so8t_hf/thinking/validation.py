"""Row validation and normalisation for thinking-SFT data (pure Python, no `datasets`).

What: `normalize_thinking_row` takes one row in any accepted shape and returns the chat messages TRL's
SFTTrainer trains on, `[system?, user, assistant, (user, assistant)...]`, with the last assistant turn in the
strict thinking format of the tag set, or the list of every problem found as `(field, reason)` pairs (field
like `thinking.safety`, `output`, `messages[2].content`, `completion[0].reasoning_content`).

Row shapes (a value of None counts as absent, as Parquet fills missing columns with nulls):
- structured: `thinking` (a mapping with exactly the tag set's section keys) and `final`, with the prompt as
  `instruction` (+ optional `input`, `system`) or as `messages` (system?/user/assistant turns ending with a user
  turn); the answer is rendered with `render_thinking`.
- instruction/output (the origin project's): `instruction`, optional `input`, optional `system`, and `output`.
- TRL prompt/completion: `prompt` + `completion`, both lists of messages (conversational: the prompt ends with a
  user turn, the completion starts with the assistant turn) or both strings (plain: the prompt becomes the user
  turn, the completion the answer).
- chat: `messages` ending with an assistant turn.
The user turn of instruction rows is `instruction`, or `instruction + "\\n\\n" + input` when `input` is non-empty.
Keys other than these are ignored (ids, language, category...).

Answers (`output`, a plain `completion`, and the `content` of assistant messages) may be written as:
- the tag format: `<think-task>...</think-task>...<final>...</final>` (kept as written, checked strictly);
- `<think>reasoning</think>answer` (DeepSeek-R1, Qwen3; the opening `<think>` may be absent, as in R1 outputs);
- plain answer text in `content` with the reasoning beside it in the message's `reasoning_content` (TRL, OpenAI-
  compatible servers, DeepSeek's API) or `thinking` (gpt-oss, LFM templates) string;
- plain answer text alone (no reasoning; `reasoning_content: null` is no reasoning): a plain chat reply.
The last three are mapped onto the tag set: the reasoning (stripped) becomes the section `reasoning_section` (a
section key, default the first: `task` for the default tags), every other section is rendered empty, and the
answer becomes the final: `<think-task>reasoning</think-task>\\n<think-safety></think-safety>\\n
<think-policy></think-policy>\\n<final>answer</final>`. Nothing is split or guessed: reasoning written for one
free-text block is not safety or policy reasoning, so those sections stay empty rather than hold invented text.
A plain answer renders with every section empty: `<think-task></think-task>\n<think-safety></think-safety>\n
<think-policy></think-policy>\n<final>answer</final>`, the canonical shape the model always answers in (sections,
then one final), so the model still opens with its sections and the final alone reaches users; it trains like
any other answer (its empty sections and its final in `loss_mask: assistant`, the final in `final_only`).

Earlier assistant turns (every assistant turn but the last one of the row): with `drop_earlier_thinking=True`
(the default) each becomes its final answer text only, stripped, which is what `so8t-hf chat` and the server
keep in their history (`extract_final` of each reply), so training sees the context inference sees. Such a turn
may also be plain text (a reply without thinking, as chat histories hold). `thinking_labels` trains no token of
a turn without tags (it is context, as a user turn is): learning to answer without thinking right after
`<|assistant|>` is the one thing the model must not learn there. With `drop_earlier_thinking=False` every
assistant turn is rendered (and trained) in the tag format, a plain one with empty sections.

Content is a string, or a list of typed parts (`[{"type": "text", "text": ...}]`, OpenAI / TRL) whose text parts
are joined with "\n" (as vLLM joins them); any other part type (`image_url`, ...) is refused by name.

Limits: roles are `system` (first message only), `user` and `assistant`, alternating from a user turn (the
Phi-3 template has no other roles). Tool use is refused with one problem per row: the Phi-3.5 template has no
`tool` role and renders neither `tool_calls` nor `tools` (it drops them), so such a row cannot be trained as
the model would see it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from so8t_hf.thinking.format import (
    DEFAULT_TAGS,
    ThinkingFormatError,
    ThinkingTags,
    find_thinking_problems,
    parse_thinking,
    render_thinking,
)
from so8t_hf.thinking.lexer import find_specials, find_tags

__all__ = ["REASONING_KEYS", "ROLES", "ROW_SHAPES", "normalize_thinking_row", "row_shape"]

ROLES = ("system", "user", "assistant")
ROW_SHAPES = ("structured", "output", "prompt_completion", "chat")
REASONING_KEYS = ("reasoning_content", "thinking")  # message-level reasoning beside a plain answer
TOOL_ROLES = ("tool", "function", "ipython")  # OpenAI / TRL, OpenAI's older name, Llama 3
TOOL_KEYS = ("tool_calls", "function_call", "tool_call_id")
TOOL_REASON = ("tool use is not supported: the Phi-3.5 chat template has no 'tool' role and renders neither "
               "'tool_calls' nor 'tools' (its own template drops them), so this row cannot be trained as the model "
               "would see it; remove the tool turns, or drop the row (on_bad_rows: skip)")
Problem = tuple[str, str]  # (field, reason)

def _present(row: Mapping[str, Any], key: str) -> bool:
    return key in row and row[key] is not None


def row_shape(row: Mapping[str, Any]) -> str | None:
    """One of `ROW_SHAPES` (`"structured"`, `"output"`, `"prompt_completion"`, `"chat"`), or None."""
    if _present(row, "thinking") or _present(row, "final"):
        return "structured"
    if _present(row, "output"):
        return "output"
    if _present(row, "prompt") or _present(row, "completion"):
        return "prompt_completion"
    if _present(row, "messages"):
        return "chat"
    return None


def _string(value: Any, field: str, problems: list[Problem], *, required: bool = True) -> str | None:
    """`value` as a string; records `missing` / `not a string` / `empty` problems."""
    if value is None:
        if required:
            problems.append((field, "missing"))
        return None
    if not isinstance(value, str):
        problems.append((field, f"must be a string, got {type(value).__name__}"))
        return None
    if required and not value.strip():
        problems.append((field, "empty"))
        return None
    return value


def _join_parts(value: list[Any], field: str, problems: list[Problem]) -> str | None:
    """The text of a list of typed content parts (`{"type": "text", "text": ...}`), joined with "\\n"."""
    texts, before = [], len(problems)
    for i, part in enumerate(value):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if not isinstance(part, Mapping):
            problems.append((f"{field}[{i}]", "a content part must be a mapping {'type': 'text', 'text': ...}, got "
                                              f"{type(part).__name__}"))
        elif kind != "text":
            problems.append((f"{field}[{i}].type", f"content part type {kind!r} is not supported: only 'text' parts "
                                                   "(the model reads text only)"))
        elif not isinstance(part.get("text"), str):
            problems.append((f"{field}[{i}].text", f"must be a string, got {type(part.get('text')).__name__}"))
        else:
            texts.append(part["text"])
    return "\n".join(texts) if len(problems) == before else None


def _tool_problem(items: list[tuple[str, Any]]) -> Problem | None:
    """The one problem of a message list that holds a tool turn or a tool call (None without)."""
    for where, msg in items:
        if not isinstance(msg, Mapping):
            continue
        if msg.get("role") in TOOL_ROLES:
            return f"{where}.role", TOOL_REASON
        for key in TOOL_KEYS:
            if msg.get(key):
                return f"{where}.{key}", TOOL_REASON
    return None


def _no_specials(text: str | None, field: str, problems: list[Problem], tags: ThinkingTags = DEFAULT_TAGS) -> None:
    """Prompt text must hold no special token and no tag string the tokenizer would encode as the tag's token."""
    for tok in dict.fromkeys(find_specials(text or "", tags)):
        problems.append((field, f"contains the special token {tok!r}; remove it (the chat template adds turns)"))
    for tag in dict.fromkeys(t for t in find_tags(text or "", tags) if t in tags.tokens):
        problems.append((field, f"contains the tag {tag!r}; remove it (it would be encoded as the tag's token)"))


def _plain(text: str | None, field: str, tags: ThinkingTags, problems: list[Problem]) -> None:
    """A thinking section or final given as a field must hold no tags (exact or disguised) and no special tokens."""
    for tag in dict.fromkeys(find_tags(text or "", tags)):
        problems.append((field, f"contains the tag {tag!r}; give plain text (tags are added when rendering)"))
    for tok in dict.fromkeys(find_specials(text or "", tags)):
        problems.append((field, f"contains the special token {tok!r}; remove it (the chat template adds turns)"))


class _Options(NamedTuple):
    tags: ThinkingTags
    section: str  # the section key that receives free-text reasoning
    drop: bool  # drop_earlier_thinking


def _split_think(text: str, field: str, problems: list[Problem]) -> tuple[str, str] | None:
    """(reasoning, answer) of `<think>reasoning</think>answer`, the opening tag optional."""
    opens, closes = text.count("<think>"), text.count("</think>")
    if not closes:
        problems.append((field, "'<think>' is never closed: write '<think>reasoning</think>answer'"))
        return None
    if opens > 1 or closes > 1:
        problems.append((field, f"holds {opens} '<think>' and {closes} '</think>': write one "
                                "'<think>reasoning</think>answer'"))
        return None
    head, _, answer = text.partition("</think>")
    if opens and "<think>" not in head:
        problems.append((field, "'<think>' comes after '</think>'"))
        return None
    before, _, reasoning = head.rpartition("<think>")
    if before.strip():
        problems.append((field, f"text before '<think>': {before.strip()[:40]!r}; the reasoning must open the answer"))
        return None
    return reasoning, answer


def _answer(content: Any, reasoning: Any, field: str, reasoning_field: str, opts: _Options,
            problems: list[Problem], *, earlier: bool) -> str | None:
    """The assistant content in the tag format, or only its final text for an earlier turn when dropping."""
    before, tags = len(problems), opts.tags
    text = _string(content, field, problems)
    thinking = None if reasoning is None else _string(reasoning, reasoning_field, problems, required=False)
    if text is None or (reasoning is not None and thinking is None):
        return None
    if thinking is not None:  # reasoning beside a plain answer
        _plain(thinking, reasoning_field, tags, problems)
        _plain(text, field, tags, problems)
        final = text
    elif "</think>" in text or text.lstrip().startswith("<think>"):  # DeepSeek-R1 / Qwen3
        parts = _split_think(text, field, problems)
        if parts is None:
            return None
        thinking, final = parts
        _plain(thinking, field, tags, problems)
        _plain(final, field, tags, problems)
        if not final.strip():
            problems.append((field, "no answer after '</think>'"))
    elif find_tags(text, tags):  # the tag format
        problems.extend((field, p) for p in find_thinking_problems(text, tags))
        if len(problems) > before:
            return None
        return parse_thinking(text, tags).final if earlier and opts.drop else text
    else:  # a plain answer, without reasoning: empty sections (an earlier turn, when dropping: the text)
        _no_specials(text, field, problems, tags)
        thinking, final = "", text
    if len(problems) > before:
        return None
    if earlier and opts.drop:
        return final.strip()
    sections = {key: "" for key in tags.keys}
    sections[opts.section] = thinking
    return render_thinking(sections, final, tags)


def _check_turns(
    items: list[tuple[str, Any]], opts: _Options, problems: list[Problem], *, last_role: str, field: str
) -> list[dict[str, str]]:
    """Validated `[{"role", "content"}]` of `(where, message)` items (empty system messages dropped). The last
    assistant turn is the answer when `last_role` is "assistant"; every other assistant turn is earlier."""
    answer_at = max((i for i, (_, m) in enumerate(items) if isinstance(m, Mapping) and m.get("role") == "assistant"),
                    default=None) if last_role == "assistant" else None
    out: list[dict[str, str]] = []
    expected = "user"
    for i, (where, msg) in enumerate(items):
        if not isinstance(msg, Mapping):
            problems.append((where, f"must be a mapping with 'role' and 'content', got {type(msg).__name__}"))
            continue
        role, content = msg.get("role"), msg.get("content")
        parts_bad = False
        if isinstance(content, list):  # typed content parts
            content = _join_parts(content, f"{where}.content", problems)
            parts_bad = content is None
        if role not in ROLES:
            problems.append((f"{where}.role", f"unknown role {role!r}; use one of {list(ROLES)}"))
            continue
        given = [k for k in REASONING_KEYS if msg.get(k) is not None]
        if given and role != "assistant":
            problems.append((f"{where}.{given[0]}", "only assistant turns carry reasoning"))
        if role == "system":
            if i != 0:
                problems.append((f"{where}.role", "a system message may only come first"))
            if parts_bad:
                continue
            text = _string(content, f"{where}.content", problems, required=False)
            _no_specials(text, f"{where}.content", problems, opts.tags)
            if text and text.strip():
                out.append({"role": "system", "content": text})
            continue
        if role != expected:
            problems.append((f"{where}.role", f"expected role '{expected}' here (turns alternate user, assistant)"))
        expected = "assistant" if role == "user" else "user"
        if parts_bad:
            continue
        if role == "user":
            text = _string(content, f"{where}.content", problems)
            _no_specials(text, f"{where}.content", problems, opts.tags)
        else:
            if len(given) > 1:
                problems.append((f"{where}.{given[1]}", f"give the reasoning once, in '{given[0]}'"))
            key = given[0] if given else REASONING_KEYS[0]
            text = _answer(content, msg.get(key), f"{where}.content", f"{where}.{key}", opts, problems,
                           earlier=i != answer_at)
        if text is not None:
            out.append({"role": role, "content": text})
    turns = [m for m in out if m["role"] != "system"]
    if not turns:
        problems.append((field, "has no user turn"))
    elif turns[-1]["role"] != last_role:
        problems.append((field, f"the last turn must be '{last_role}', got '{turns[-1]['role']}'"))
    return out


def _message_list(value: Any, field: str, problems: list[Problem]) -> list[tuple[str, Any]]:
    if not isinstance(value, list) or not value:
        problems.append((field, "must be a non-empty list of {'role', 'content'} messages"))
        return []
    return [(f"{field}[{i}]", m) for i, m in enumerate(value)]


def _check_messages(
    messages: Any, opts: _Options, problems: list[Problem], *, last_role: str, field: str = "messages"
) -> list[dict[str, str]]:
    items = _message_list(messages, field, problems)
    return _check_turns(items, opts, problems, last_role=last_role, field=field) if items else []


def _instruction_prompt(row: Mapping[str, Any], problems: list[Problem], tags: ThinkingTags) -> list[dict[str, str]]:
    instruction = _string(row.get("instruction"), "instruction", problems)
    extra = _string(row.get("input"), "input", problems, required=False)
    system = _string(row.get("system"), "system", problems, required=False)
    for text, field in ((instruction, "instruction"), (extra, "input"), (system, "system")):
        _no_specials(text, field, problems, tags)
    if instruction is None:
        return []
    user = instruction if not (extra and extra.strip()) else f"{instruction}\n\n{extra}"
    return ([{"role": "system", "content": system}] if system and system.strip() else []) + [
        {"role": "user", "content": user}
    ]


def _prompt(row: Mapping[str, Any], opts: _Options, problems: list[Problem]) -> list[dict[str, str]]:
    """The prompt turns of a structured row."""
    if _present(row, "messages"):
        if _present(row, "instruction") or _present(row, "input"):
            problems.append(("messages", "give the prompt as 'messages' or as 'instruction'/'input', not both"))
        if _present(row, "system"):
            problems.append(("system", "put the system prompt inside 'messages' when the prompt is 'messages'"))
        return _check_messages(row["messages"], opts, problems, last_role="user")
    return _instruction_prompt(row, problems, opts.tags)


def _structured_answer(row: Mapping[str, Any], tags: ThinkingTags, problems: list[Problem]) -> str | None:
    before = len(problems)
    thinking = row.get("thinking")
    sections: dict[str, str] = {}
    if thinking is None:
        problems.append(("thinking", f"missing (a mapping with keys {list(tags.keys)})"))
    elif not isinstance(thinking, Mapping):
        problems.append(("thinking", f"must be a mapping with keys {list(tags.keys)}, got {type(thinking).__name__}"))
    else:
        for key in tags.keys:
            text = _string(thinking.get(key), f"thinking.{key}", problems)
            _plain(text, f"thinking.{key}", tags, problems)
            sections[key] = text or ""
        for key in thinking:
            if key not in tags.keys and thinking[key] is not None:
                problems.append((f"thinking.{key}", f"unknown section; this tag set has {list(tags.keys)}"))
    final = _string(row.get("final"), "final", problems)
    _plain(final, "final", tags, problems)
    if len(problems) > before:
        return None
    try:
        return render_thinking(sections, final, tags)
    except ThinkingFormatError as err:  # not expected after the checks above; reported, never raised
        problems.extend(("thinking", p) for p in err.problems)
        return None


def _prompt_completion(row: Mapping[str, Any], opts: _Options, problems: list[Problem]) -> list[dict[str, str]]:
    """TRL's prompt/completion row: both strings (plain) or both message lists (conversational)."""
    prompt, completion = row.get("prompt"), row.get("completion")
    for key, value in (("prompt", prompt), ("completion", completion)):
        if value is None:
            problems.append((key, "missing (TRL's prompt/completion rows need both)"))
    if prompt is None or completion is None:
        return []
    if isinstance(prompt, str) and isinstance(completion, str):
        user = _string(prompt, "prompt", problems)
        _no_specials(user, "prompt", problems, opts.tags)
        answer = _answer(completion, None, "completion", "completion", opts, problems, earlier=False)
        return [{"role": "user", "content": user or ""}, {"role": "assistant", "content": answer or ""}]
    if not (isinstance(prompt, list) and isinstance(completion, list)):
        problems.append(("completion", "'prompt' and 'completion' must both be strings (plain) or both lists of "
                                       f"messages (conversational); got {type(prompt).__name__} and "
                                       f"{type(completion).__name__}"))
        return []
    head, tail = _message_list(prompt, "prompt", problems), _message_list(completion, "completion", problems)
    if not head or not tail:
        return []
    last = prompt[-1].get("role") if isinstance(prompt[-1], Mapping) else None
    if last != "user":
        problems.append(("prompt", f"the last turn of the prompt must be 'user', got {last!r}"))
    return _check_turns(head + tail, opts, problems, last_role="assistant", field="completion")


_OTHER_SHAPES = {  # keys that belong to another shape: (keys, message)
    "structured": (("output", "prompt", "completion"), "give either '{key}' or 'thinking' + 'final', not both"),
    "output": (("messages", "prompt", "completion"), "give either '{key}' or 'instruction' + 'output', not both"),
    "prompt_completion": (("messages", "instruction", "input", "system"),
                          "a prompt/completion row holds its turns in 'prompt' and 'completion' only"),
    "chat": (("instruction", "input", "system"), "a chat row holds its turns in 'messages' only"),
}


def normalize_thinking_row(
    row: Any,
    tags: ThinkingTags = DEFAULT_TAGS,
    system_prompt: str | None = None,
    *,
    reasoning_section: str | None = None,
    drop_earlier_thinking: bool = True,
) -> tuple[list[dict[str, str]] | None, list[Problem]]:
    """`(messages, [])` for a good row, `(None, problems)` for a bad one (every problem found).

    `system_prompt` is added as the first message of rows that have no system message. `reasoning_section`: the
    section key that receives free-text reasoning (`reasoning_content`, `<think>`); default the first section.
    `drop_earlier_thinking`: earlier assistant turns keep only their final text (see the module docstring).
    """
    section = tags.keys[0] if reasoning_section is None else reasoning_section
    if section not in tags.keys:
        raise ValueError(f"reasoning_section={section!r} is not a section of this tag set; choose one of "
                         f"{list(tags.keys)}")
    opts = _Options(tags, section, drop_earlier_thinking)
    if not isinstance(row, Mapping):
        return None, [("", f"a row must be a JSON object, got {type(row).__name__}")]
    problems: list[Problem] = []
    shape = row_shape(row)
    if shape is None:
        keys = sorted(k for k in row if row[k] is not None)
        return None, [("", "unknown row shape: give 'thinking' + 'final' (structured), 'instruction' + 'output', "
                           f"'prompt' + 'completion' (TRL), or 'messages' (chat); the row has keys {keys}")]
    lists = [(key, row.get(key)) for key in ("messages", "prompt", "completion") if isinstance(row.get(key), list)]
    tool = _tool_problem([(f"{key}[{i}]", m) for key, value in lists for i, m in enumerate(value)])
    if tool is not None or row.get("tools"):  # one problem for one cause
        return None, [tool or ("tools", TOOL_REASON)]
    others, message = _OTHER_SHAPES[shape]
    problems += [(key, message.format(key=key)) for key in others if _present(row, key)]
    if shape == "structured":
        prompt = _prompt(row, opts, problems)
        answer = _structured_answer(row, tags, problems)
        messages = prompt + [{"role": "assistant", "content": answer or ""}]
    elif shape == "output":
        prompt = _instruction_prompt(row, problems, opts.tags)
        output = _answer(row.get("output"), None, "output", "output", opts, problems, earlier=False)
        messages = prompt + [{"role": "assistant", "content": output or ""}]
    elif shape == "prompt_completion":
        messages = _prompt_completion(row, opts, problems)
    else:
        messages = _check_messages(row["messages"], opts, problems, last_role="assistant")
    if problems:
        return None, list(dict.fromkeys(problems))
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return messages, []
