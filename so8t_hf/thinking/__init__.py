"""The thinking format and everything built on it: the one tag lexer (`lexer`), the format, its strict parser and
fail-closed reader (`format`), the Phi-3 chat template, tag tokens and loss labels (`chat_template`), data files,
loading and validation (`readers`, `data`, `validation`), and the thinking metrics (`metrics`). Importing this
package loads only the format and its lexer (pure Python)."""

from so8t_hf.thinking.format import (
    DEFAULT_TAGS,
    TAG_PRESETS,
    FinalReading,
    ParsedThinking,
    ThinkingFormatError,
    ThinkingTags,
    extract_final,
    find_thinking_problems,
    get_tag_preset,
    parse_thinking,
    read_final,
    render_thinking,
    thinking_hash,
    validate_thinking,
    visible_final_prefix,
)

__all__ = ["DEFAULT_TAGS", "TAG_PRESETS", "FinalReading", "ParsedThinking", "ThinkingFormatError", "ThinkingTags",
           "extract_final", "find_thinking_problems", "get_tag_preset", "parse_thinking", "read_final",
           "render_thinking", "thinking_hash", "validate_thinking", "visible_final_prefix"]
