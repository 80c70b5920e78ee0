"""Publish a finished thinking-SFT run to the Hub: stage the repo (`staging.stage_output_dir`), then create the
repo once with the user's visibility (private by default) and upload the staged folder in one commit.

The visibility choice holds: an existing repo of the other visibility is an error before any upload (never a
private run pushed into a public repo). `dry_run=DIR` stages into DIR and touches nothing on the Hub; a push
uploads exactly such a folder. Used by `so8t-hf push` and by the recipe's `--push_to_hub`.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from so8t_hf.hub.staging import stage_output_dir

logger = logging.getLogger(__name__)

__all__ = ["ensure_repo", "push_output_dir"]


def ensure_repo(api, repo_id: str, private: bool) -> None:
    """Create `repo_id` with `private`, or check that the existing repo has that visibility."""
    if not api.repo_exists(repo_id, repo_type="model"):
        api.create_repo(repo_id, private=private, repo_type="model", exist_ok=False)
        logger.info("created the %s repo %s", "private" if private else "public", repo_id)
        return
    info = api.repo_info(repo_id, repo_type="model")
    if bool(info.private) != private:
        have, want = ("private", "public") if info.private else ("public", "private")
        raise ValueError(f"{repo_id} already exists and is {have}, but this push asks for a {want} repo; nothing "
                         f"was uploaded. Push with --{have} to keep it {have}, or change its visibility in the repo "
                         "settings on the Hub first.")
    logger.info("pushing to the existing %s repo %s", "private" if private else "public", repo_id)


def push_output_dir(output_dir: str | Path, repo_id: str | None, *, private: bool = True, token: str | None = None,
                    dry_run: str | Path | None = None, api=None, **card) -> str:
    """Stage the run in `output_dir` and upload it to `repo_id` (created `private` unless it exists); returns
    the commit URL, or with `dry_run` the staging folder (nothing uploaded). `card`: `base_model`, `license`,
    `language`, `datasets` for the model cards (`stage_output_dir`). `api`: an `HfApi` (default: a new one)."""
    from huggingface_hub.utils import validate_repo_id

    if not repo_id:
        raise ValueError("pushing needs a repo id: so8t-hf push OUTPUT_DIR --repo-id you/name "
                         "(the recipe: --push_to_hub --hub_model_id you/name)")
    validate_repo_id(repo_id)
    if dry_run is not None:
        files = stage_output_dir(output_dir, dry_run, repo_id, **card)
        logger.info("dry run: %d files staged in %s; nothing uploaded", len(files), dry_run)
        return str(dry_run)
    with tempfile.TemporaryDirectory(prefix="so8t-push-") as tmp:
        staged = Path(tmp) / "repo"
        stage_output_dir(output_dir, staged, repo_id, **card)  # fails before the Hub is touched
        if api is None:
            from huggingface_hub import HfApi

            api = HfApi(token=token)
        ensure_repo(api, repo_id, private)
        commit = api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=staged,
                                   commit_message="so8t_hf thinking SFT: model, adapter, cards")
    logger.info("pushed %s: %s", repo_id, commit)
    return str(commit)
