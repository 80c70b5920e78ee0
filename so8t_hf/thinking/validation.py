"""Row validation and normalisation for thinking-SFT data (pure Python, no `datasets`).

What: `normalize_thinking_row` takes one row in any of the three accepted shapes and returns
the chat messages TRL's SFTTrainer trains on, `[system?, user, assistant, (user, assistant)...]`,
with every assistant content in the strict thinking format, or the list of every problem found
as `(field, reason)` pairs (field like `thinking.safety`, `output`, `messages[2].content`).

Row shapes (a value of None counts as absent, as Parquet fills missing columns with nulls):
- (a) structured: `thinking` (a mapping with exactly the tag set's section keys) and `final`,
  with the prompt as `instruction` (+ optional `input`, `system`) or as `messages` (system?/user
  turns, ending with a user turn); the answer is rendered with `render_thinking`.
- (b) instruction/output (the origin project's): `instruction`, optional `input`, optional
  `system`, and `output` that already holds the tags.
- (c) chat: `messages` ending with an assistant turn whose content holds the tags.
The user turn is `instruction`, or `instruction + "\\n\\n" + input` when `input` is non-empty.
Keys other than these are ignored (ids, language, category...).

Limits: roles are `system` (first message only), `user` and `assistant`, alternating from a user
turn (the Phi-3 template has no other roles). Every assistant turn, earlier ones included, must be
well formed, because the chat template trains on all of them. Content must be plain strings.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from so8t_hf.thinking.format import (
    DEFAULT_TAGS,
    ThinkingFormatError,
    ThinkingTags,
    find_thinking_problems,
    render_thinking,
)
from so8t_hf.thinking.lexer import find_specials, find_tags

__all__ = ["ROLES", "normalize_thinking_row", "row_shape"]

ROLES = ("system", "user", "assistant")
Problem = tuple[str, str]  # (field, reason)

def _present(row: Mapping[str, Any], key: str) -> bool:
    return key in row and row[key] is not None


def row_shape(row: Mapping[str, Any]) -> str | None:
    """`"structured"`, `"output"`, `"chat"`, or None when the keys match no shape."""
    if _present(row, "thinking") or _present(row, "final"):
        return "structured"
    if _present(row, "output"):
        return "output"
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


def _check_messages(
    messages: Any, tags: ThinkingTags, problems: list[Problem], *, last_role: str, field: str = "messages"
) -> list[dict[str, str]]:
    """Validated `[{"role", "content"}]` (empty system messages dropped); problems appended."""
    if not isinstance(messages, list) or not messages:
        problems.append((field, "must be a non-empty list of {'role', 'content'} messages"))
        return []
    out: list[dict[str, str]] = []
    expected = "user"
    for i, msg in enumerate(messages):
        where = f"{field}[{i}]"
        if not isinstance(msg, Mapping):
            problems.append((where, f"must be a mapping with 'role' and 'content', got {type(msg).__name__}"))
            continue
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            problems.append((f"{where}.role", f"unknown role {role!r}; use one of {list(ROLES)}"))
            continue
        if role == "system":
            if i != 0:
                problems.append((f"{where}.role", "a system message may only come first"))
            text = _string(content, f"{where}.content", problems, required=False)
            _no_specials(text, f"{where}.content", problems, tags)
            if text and text.strip():
                out.append({"role": "system", "content": text})
            continue
        if role != expected:
            problems.append((f"{where}.role", f"expected role '{expected}' here (turns alternate user, assistant)"))
        expected = "assistant" if role == "user" else "user"
        text = _string(content, f"{where}.content", problems)
        if text is None:
            continue
        if role == "user":
            _no_specials(text, f"{where}.content", problems, tags)
        else:
            problems.extend((f"{where}.content", p) for p in find_thinking_problems(text, tags))
        out.append({"role": role, "content": text})
    turns = [m for m in out if m["role"] != "system"]
    if not turns:
        problems.append((field, "has no user turn"))
    elif turns[-1]["role"] != last_role:
        problems.append((field, f"the last turn must be '{last_role}', got '{turns[-1]['role']}'"))
    return out


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


def _prompt(row: Mapping[str, Any], tags: ThinkingTags, problems: list[Problem]) -> list[dict[str, str]]:
    """The prompt turns of a structured or instruction/output row."""
    if _present(row, "messages"):
        if _present(row, "instruction") or _present(row, "input"):
            problems.append(("messages", "give the prompt as 'messages' or as 'instruction'/'input', not both"))
        if _present(row, "system"):
            problems.append(("system", "put the system prompt inside 'messages' when the prompt is 'messages'"))
        return _check_messages(row["messages"], tags, problems, last_role="user")
    return _instruction_prompt(row, problems, tags)


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


def normalize_thinking_row(
    row: Any, tags: ThinkingTags = DEFAULT_TAGS, system_prompt: str | None = None
) -> tuple[list[dict[str, str]] | None, list[Problem]]:
    """`(messages, [])` for a good row, `(None, problems)` for a bad one (every problem found).

    `system_prompt` is added as the first message of rows that have no system message.
    """
    if not isinstance(row, Mapping):
        return None, [("", f"a row must be a JSON object, got {type(row).__name__}")]
    problems: list[Problem] = []
    shape = row_shape(row)
    if shape is None:
        keys = sorted(k for k in row if row[k] is not None)
        return None, [("", "unknown row shape: give 'thinking' + 'final' (structured), 'instruction' + 'output', "
                           f"or 'messages' (chat); the row has keys {keys}")]
    if shape == "structured":
        if _present(row, "output"):
            problems.append(("output", "give either 'output' or 'thinking' + 'final', not both"))
        prompt = _prompt(row, tags, problems)
        answer = _structured_answer(row, tags, problems)
        messages = prompt + [{"role": "assistant", "content": answer or ""}]
    elif shape == "output":
        if _present(row, "messages"):
            problems.append(("messages", "give either 'messages' or 'instruction' + 'output', not both"))
        prompt = _instruction_prompt(row, problems, tags)
        output = _string(row.get("output"), "output", problems)
        if output is not None:
            problems.extend(("output", p) for p in find_thinking_problems(output, tags))
        messages = prompt + [{"role": "assistant", "content": output or ""}]
    else:
        for key in ("instruction", "input", "system"):
            if _present(row, key):
                problems.append((key, "a chat row holds its turns in 'messages' only"))
        messages = _check_messages(row["messages"], tags, problems, last_role="assistant")
    if problems:
        return None, list(dict.fromkeys(problems))
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return messages, []
