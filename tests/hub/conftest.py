"""Fixtures of the Hub tests: one recipe run staged for the Hub (`hub_helpers.make_run`), and the checks of the
staged repo run once in a process that cannot import so8t_hf."""

import json
import re

import pytest
import torch
from hub_helpers import BASE_ID, REPO_ID, make_run
from isolated_checks import CHECKS
from isolation import run_isolated
from paths import REPO

README_REPO_ID = "you/so8t-phi35-thinking"  # the repo id the README's Hub section uses


def snippets(hub_run) -> dict[str, str]:
    """The python blocks of the staged cards and of the README's Hub section, ids replaced by local folders."""
    found = {}
    for card in ("README.md", "adapter/README.md"):
        for i, block in enumerate(re.findall(r"```python\n(.*?)```", (hub_run.stage / card).read_text(), re.S)):
            found[f"{card}#{i}"] = block.replace(REPO_ID, str(hub_run.stage))
    section = (REPO / "README.md").read_text().split("## Publishing to the Hub", 1)[1].split("\n## ", 1)[0]
    for i, block in enumerate(re.findall(r"```python\n(.*?)```", section, re.S)):
        found[f"repo README#{i}"] = block.replace(README_REPO_ID, str(hub_run.stage))
    return {name: code.replace(BASE_ID, str(hub_run.base)) for name, code in found.items()}


@pytest.fixture(scope="session")
def hub_run(tmp_path_factory, phi35_tokenizer_dir):
    return make_run(tmp_path_factory.mktemp("hub"), phi35_tokenizer_dir)


@pytest.fixture(scope="session")
def hub_checks(hub_run, tmp_path_factory):
    """The results of `isolated_checks.CHECKS` on the staged repo (a dict)."""
    tmp = tmp_path_factory.mktemp("isolated")
    torch.save((hub_run.ids, hub_run.logits), tmp / "expected.pt")
    (tmp / "snippets.json").write_text(json.dumps(snippets(hub_run)))
    out = run_isolated(CHECKS, str(hub_run.stage), str(hub_run.base), str(tmp / "expected.pt"),
                       str(tmp / "snippets.json"), tmp_path=tmp)
    return json.loads(out.split("RESULT", 1)[1])
