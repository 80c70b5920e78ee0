"""Publish a thinking-SFT output directory to the Hugging Face Hub (adapter, SO(8) params, remote code, card)."""

from __future__ import annotations

from pathlib import Path

SKIP = ["checkpoint-*", "checkpoint-*/**", "runs/**"]  # resumable trainer state, not release artefacts


def push_output_dir(output_dir: str | Path, repo_id: str | None, token: str | None = None, private: bool = True) -> str:
    """Upload `output_dir` (minus trainer checkpoints) to `repo_id`; returns the commit URL."""
    from huggingface_hub import HfApi

    output_dir = Path(output_dir)
    if not repo_id:
        raise ValueError("--push_to_hub needs --hub_model_id (e.g. your-name/so8t-phi35-thinking)")
    for required in ("final/config.json", "README.md"):
        if not (output_dir / required).is_file():
            raise FileNotFoundError(f"{output_dir / required} is missing: run the recipe to the end before pushing")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(repo_id=repo_id, folder_path=output_dir, ignore_patterns=SKIP,
                               commit_message="so8t_hf thinking SFT")
    return str(commit)
