"""Pushing, offline against a stand-in `HfApi`: the recipe's --push_to_hub creates the repo once, private, after
training (the Trainer's own start-up create_repo is off); a push uploads exactly what --dry-run stages; the
visibility choice holds against an existing repo; a dry run calls nothing; bad input fails before the Hub."""

import pytest
from hub_helpers import BASE_ID, REPO_ID, RecordingHfApi, staged_files

from so8t_hf.cli import main
from so8t_hf.hub import push_output_dir


def test_recipe_push_to_hub_creates_the_repo_once_private_after_training(hub_run):
    assert hub_run.api.calls == [("repo_exists", REPO_ID), ("create_repo", REPO_ID, True, False),
                                 ("upload_folder", REPO_ID)]
    uploaded = staged_files(next(hub_run.api.uploads.iterdir()))
    assert "model.safetensors" in uploaded and "adapter/adapter_model.safetensors" in uploaded
    assert not [f for f in uploaded if f.startswith("checkpoint") or f.startswith("runs")]


def test_a_push_uploads_exactly_what_dry_run_stages(hub_run, tmp_path):
    api = RecordingHfApi(tmp_path / "uploads")
    url = push_output_dir(hub_run.out, REPO_ID, api=api, base_model=BASE_ID, language=["en", "ja"])
    assert url == f"https://huggingface.co/{REPO_ID}/commit/0"
    assert api.calls == [("repo_exists", REPO_ID), ("create_repo", REPO_ID, True, False), ("upload_folder", REPO_ID)]
    assert staged_files(next((tmp_path / "uploads").iterdir())) == staged_files(hub_run.stage)


@pytest.mark.parametrize("existing, flag, outcome", [
    (True, [], "create-none"),  # existing private repo, default private: upload, no create
    (False, [], "public"),  # existing public repo, default private: refused
    (True, ["--public"], "private"),  # existing private repo, --public: refused
    (None, ["--public"], "create-public"),
    (None, ["--private"], "create-private"),
])
def test_the_visibility_choice_holds(hub_run, tmp_path, monkeypatch, capsys, existing, flag, outcome):
    api = RecordingHfApi(tmp_path / "uploads", existing={} if existing is None else {REPO_ID: existing})
    api.patch(monkeypatch)
    argv = ["push", str(hub_run.out), "--repo-id", REPO_ID, "--base-model", BASE_ID, *flag]
    if outcome in ("public", "private"):
        with pytest.raises(ValueError, match=f"already exists and is {outcome}.*nothing was uploaded"):
            main(argv)
        assert api.calls == [("repo_exists", REPO_ID), ("repo_info", REPO_ID)]
        return
    assert main(argv) == 0
    creates = [c for c in api.calls if c[0] == "create_repo"]
    if outcome == "create-none":
        assert creates == []
    else:
        assert creates == [("create_repo", REPO_ID, outcome == "create-private", False)]
    assert api.calls[-1] == ("upload_folder", REPO_ID)
    assert "pushed" in capsys.readouterr().out


def test_dry_run_touches_nothing_on_the_hub_and_lists_the_files(hub_run, tmp_path, monkeypatch, capsys):
    api = RecordingHfApi(tmp_path / "uploads")
    api.patch(monkeypatch)
    assert main(["push", str(hub_run.out), "--repo-id", REPO_ID, "--public", "--dry-run", str(tmp_path / "s")]) == 0
    assert api.calls == []
    out = capsys.readouterr().out
    assert f"for {REPO_ID} (public) staged" in out and "adapter/adapter_model.safetensors" in out
    with pytest.raises(FileExistsError, match="not empty"):
        main(["push", str(hub_run.out), "--repo-id", REPO_ID, "--dry-run", str(tmp_path / "s")])


def test_bad_input_fails_before_the_hub(hub_run, tmp_path, monkeypatch):
    api = RecordingHfApi(tmp_path / "uploads")
    api.patch(monkeypatch)
    with pytest.raises(FileNotFoundError, match="not a finished so8t_hf run"):
        main(["push", str(tmp_path), "--repo-id", REPO_ID])
    with pytest.raises(ValueError, match="repo"):
        main(["push", str(hub_run.out), "--repo-id", "not a/valid/id"])
    with pytest.raises(ValueError, match="hub_model_id"):
        push_output_dir(hub_run.out, None)
    assert api.calls == []
