"""Staging a run written by so8t_hf 0.1 (tags as special tokens, no <|end|> in the generation config, no pipeline,
no run summary): the staged root gains what a release needs, and the cards say what is unknown."""

import json
import shutil

from hub_helpers import REPO_ID
from transformers import AddedToken, AutoTokenizer

from so8t_hf.hub import stage_output_dir
from so8t_hf.thinking import DEFAULT_TAGS


def test_an_old_run_is_completed_when_staged(hub_run, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(hub_run.out / "final", old / "final")
    shutil.copytree(hub_run.out / "adapter", old / "adapter")
    for name in ("pipeline_so8t_thinking.py", "format.py", "lexer.py"):
        (old / "final" / name).unlink()
    config = json.loads((old / "final/config.json").read_text())
    del config["custom_pipelines"], config["thinking_tags"]
    (old / "final/config.json").write_text(json.dumps(config))
    generation = json.loads((old / "final/generation_config.json").read_text())
    (old / "final/generation_config.json").write_text(json.dumps({**generation, "eos_token_id": 32000}))
    tokenizer = AutoTokenizer.from_pretrained(hub_run.base)  # the tags as 0.1 added them: special tokens
    tokenizer.add_special_tokens({"extra_special_tokens": [AddedToken(t, normalized=False, special=True)
                                                           for t in DEFAULT_TAGS.tokens]}, replace_extra_special_tokens=False)
    tokenizer.save_pretrained(old / "final")

    files = stage_output_dir(old, tmp_path / "stage", REPO_ID)
    stage = tmp_path / "stage"
    assert {"pipeline_so8t_thinking.py", "format.py", "lexer.py", "grammar.py", "screen.py", "adapter/README.md"} <= {
        str(f.relative_to(stage)) for f in files}
    eos = json.loads((stage / "generation_config.json").read_text())["eos_token_id"]
    assert eos[0] == 32007 and 32000 in eos  # <|end|> first, the EOS kept
    staged = json.loads((stage / "config.json").read_text())
    assert staged["custom_pipelines"]["text-generation"]["impl"].startswith("pipeline_so8t_thinking.")
    assert staged["thinking_tags"] == {"sections": list(DEFAULT_TAGS.sections), "final": "final"}
    tok = AutoTokenizer.from_pretrained(stage)
    ids = tok.encode("a<final>b</final>", add_special_tokens=False)
    assert len(ids) == 4 and tok.decode(ids, skip_special_tokens=True) == "a<final>b</final>"
    card = (stage / "README.md").read_text()
    assert "No evaluation was run." in card and "Do not load the adapter" in card
    assert (old / "final/generation_config.json").read_text().count("32007") == 0  # the run itself is untouched
