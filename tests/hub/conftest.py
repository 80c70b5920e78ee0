"""Fixtures of the Hub tests: one recipe run staged for the Hub (`hub_helpers.make_run`), and the checks of the
staged repo run once in a process that cannot import so8t_hf."""

import json

import pytest
import torch
from hub_helpers import BASE_ID, REPO_ID, make_run
from isolation import run_isolated
from isolated_checks import CHECKS


@pytest.fixture(scope="session")
def hub_run(tmp_path_factory, phi35_tokenizer_dir):
    return make_run(tmp_path_factory.mktemp("hub"), phi35_tokenizer_dir)


@pytest.fixture(scope="session")
def hub_checks(hub_run, tmp_path_factory):
    """The results of `isolated_checks.CHECKS` on the staged repo (a dict)."""
    tmp = tmp_path_factory.mktemp("isolated")
    torch.save((hub_run.ids, hub_run.logits), tmp / "expected.pt")
    out = run_isolated(CHECKS, str(hub_run.stage), str(hub_run.base), str(tmp / "expected.pt"), REPO_ID, BASE_ID,
                       tmp_path=tmp)
    return json.loads(out.split("RESULT", 1)[1])
