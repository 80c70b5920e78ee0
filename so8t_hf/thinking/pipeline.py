"""`So8tThinkingPipeline`: a `text-generation` pipeline that returns only the final answer of a thinking model.

What: `transformers.TextGenerationPipeline` whose text outputs are the final of the generation under the
positive grammar (`grammar.py`, read on the generated token ids: a tag is its id; "" when the output does not
parse as sections + one clean final, never the thinking). Chat input gives the conversation plus
`{"role": "assistant", "content": <final>}` (`return_full_text=False`: the final alone). A string prompt is one
user turn, `[{"role": "user", "content": prompt}]`, rendered with the chat template and answered exactly as that
chat (the model was trained on chat turns only; continuing the bare string, as a stock pipeline does, gives no
final); a string that already ends with the template's generation prompt (`<|assistant|>`) is continued as it
is, as text. `return_raw_text=True` adds `raw_generated_text`, the generation with its tags (developers,
audits). `return_tensors=True` is unchanged. The tag set is the model's `config.thinking_tags` (the default set
when absent).

Generation is greedy unless asked otherwise (`do_sample=True`, or a `do_sample` in the model's generation
config): two calls with the same input give the same answer. transformers' own `text-generation` default
samples (`do_sample=True, temperature=0.7`); this pipeline keeps only its `max_new_tokens=256`.

Shipped as remote code: every so8t_hf checkpoint holds this file as `pipeline_so8t_thinking.py`, the thinking
format beside it as `format.py` (with `grammar.py`, `screen.py`, `lexer.py`), and names the class in
`config.json` under `custom_pipelines`, so `pipeline("text-generation", model=REPO, trust_remote_code=True)`
runs it (without `trust_remote_code` transformers refuses that repo's pipeline). Imports transformers, `.format`
and `.grammar` (standard library only), never so8t_hf. Limits: reads the token ids of
`TextGenerationPipeline._forward`'s outputs (`generated_sequence`, `input_ids`), as transformers 5 gives them.
A `streamer=` (TextStreamer, TextIteratorStreamer) is wrapped (`grammar.FinalOnlyStreamer`): it receives the
final alone, at the end; any other streamer is refused.

Origin: transformers' custom pipelines (`custom_pipelines` in a model's config, as databricks/dolly-v2 ships
its instruction pipeline).
"""

import logging

from transformers import GenerationConfig, TextGenerationPipeline
from transformers.pipelines.text_generation import Chat, ReturnType

from .format import DEFAULT_TAGS, ThinkingTags, extract_final
from .grammar import FinalOnlyStreamer, IdTable, read_ids

logger = logging.getLogger(__name__)

def model_tags(config) -> ThinkingTags:
    """The tag set a model was trained with (`config.thinking_tags`), else the default set."""
    tags = getattr(config, "thinking_tags", None)
    if not tags:
        return DEFAULT_TAGS
    return ThinkingTags(sections=tuple(tags["sections"]), final=tags["final"])


GENERATION_PROMPT = "<|assistant|>"  # the end of a prompt that the chat template has already rendered


class So8tThinkingPipeline(TextGenerationPipeline):
    """`TextGenerationPipeline` that shows only the final answer (see the module docstring)."""

    _default_generation_config = GenerationConfig(max_new_tokens=256)  # greedy: transformers' default samples

    def preprocess(self, prompt_text, *args, **kwargs):
        if isinstance(prompt_text, str) and not prompt_text.rstrip().endswith(GENERATION_PROMPT):
            prompt_text = Chat([{"role": "user", "content": prompt_text}])  # one user turn, as the model was trained
        return super().preprocess(prompt_text, *args, **kwargs)

    def _sanitize_parameters(self, return_raw_text=None, **kwargs):
        preprocess, forward, postprocess = super()._sanitize_parameters(**kwargs)
        if return_raw_text is not None:
            postprocess["return_raw_text"] = return_raw_text
        streamer = forward.get("streamer")
        if streamer is not None and not isinstance(streamer, FinalOnlyStreamer):
            forward["streamer"] = FinalOnlyStreamer(streamer, self._id_table())
        return preprocess, forward, postprocess

    def _id_table(self):
        """The grammar's id table (None when the tags are not single tokens: the decoded text is read, logged)."""
        if not hasattr(self, "_so8t_ids"):
            eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
            stops = [*(eos if isinstance(eos, list) else [] if eos is None else [eos]), self.tokenizer.pad_token_id]
            try:
                stops = [i for i in stops if i is not None]
                self._so8t_ids = IdTable.of(self.tokenizer, model_tags(self.model.config), stops)
            except ValueError as exc:
                logger.warning("reading finals on decoded text: %s", exc)
                self._so8t_ids = None
        return self._so8t_ids

    def _final(self, ids, text, tags):
        table = self._id_table()
        return read_ids(ids, table).final if table is not None else extract_final(text, tags)

    def postprocess(self, model_outputs, return_type=ReturnType.FULL_TEXT, return_raw_text=False, **kwargs):
        records = super().postprocess(model_outputs, return_type=return_type, **kwargs)
        if return_type not in (ReturnType.FULL_TEXT, ReturnType.NEW_TEXT):
            return records
        input_ids = model_outputs["input_ids"]
        start = 0 if input_ids is None else input_ids.shape[-1]
        prompt = model_outputs["prompt_text"]
        messages = list(getattr(prompt, "messages", None) or [])
        tags = model_tags(self.model.config)
        for record, sequence in zip(records, model_outputs["generated_sequence"][0].tolist()):
            raw = self.tokenizer.decode(sequence[start:], skip_special_tokens=False)  # turn ends stay visible
            out = record["generated_text"]
            if isinstance(out, list):  # chat: the last message is the answer
                continued = len(out) == len(messages)  # an assistant prefill that the generation continued
                final = extract_final(messages[-1]["content"] + raw, tags) if continued else \
                    self._final(sequence[start:], raw, tags)  # a prefill is text: read the text
                out[-1] = {"role": "assistant", "content": final}
            elif return_type == ReturnType.FULL_TEXT and isinstance(prompt, str):
                record["generated_text"] = prompt + self._final(sequence[start:], raw, tags)
            else:
                record["generated_text"] = self._final(sequence[start:], raw, tags)
            if return_raw_text:
                record["raw_generated_text"] = raw
        return records
