"""Helpers of the Hub tests: a stand-in for `HfApi` that records calls and uploads, and `make_run`: a small stock
Phi-3 (Phi-3.5's vocabulary and real tokenizer) fine-tuned for a few steps by the recipe with `--push_to_hub`
against that stand-in, then staged by `so8t-hf push --dry-run`, with the trained model's logits (the PEFT model,
unmerged, on the SO8T-Phi3 form of the base)."""

import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from paths import REPO

REPO_ID = "me/so8t-tiny"
BASE_ID = "microsoft/Phi-3.5-mini-instruct"  # what the cards name; the test base is a local stand-in of it
TAG_IDS = list(range(32011, 32019))


class RecordingHfApi:
    """Stand-in for `huggingface_hub.HfApi` methods: records every call and copies what `upload_folder` uploads."""

    def __init__(self, uploads: Path, existing: dict[str, bool] | None = None):
        self.calls: list[tuple] = []
        self.uploads = uploads
        self.existing = dict(existing or {})  # repo id -> private

    def repo_exists(self, repo_id, repo_type=None, **kwargs):
        self.calls.append(("repo_exists", repo_id))
        return repo_id in self.existing

    def repo_info(self, repo_id, repo_type=None, **kwargs):
        self.calls.append(("repo_info", repo_id))
        return SimpleNamespace(id=repo_id, private=self.existing[repo_id])

    def create_repo(self, repo_id, private=None, repo_type=None, exist_ok=False, **kwargs):
        self.calls.append(("create_repo", repo_id, private, exist_ok))
        self.existing[repo_id] = bool(private)
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, repo_id, folder_path, **kwargs):
        self.calls.append(("upload_folder", repo_id))
        target = self.uploads / f"upload{len(self.calls)}"
        shutil.copytree(folder_path, target)
        return f"https://huggingface.co/{repo_id}/commit/0"

    def patch(self, monkeypatch):
        """Route every `HfApi` in the process (ours and the Trainer's `hf_api()`) to this recorder."""
        import huggingface_hub

        for name in ("repo_exists", "repo_info", "create_repo", "upload_folder"):
            monkeypatch.setattr(huggingface_hub.HfApi, name, lambda _self, *a, _n=name, **k: getattr(self, _n)(*a, **k))


def staged_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def make_run(root: Path, phi35_tokenizer_dir: Path) -> SimpleNamespace:
    sys.path.insert(0, str(REPO / "scripts"))
    sys.path.insert(0, str(REPO / "recipes"))
    import make_phi35_shaped
    import thinking_sft
    from peft import PeftModel
    from transformers import AutoTokenizer

    from so8t_hf.cli import main
    from so8t_hf.modeling import So8tPhi3ForCausalLM

    base = root / "base"
    make_phi35_shaped.main(["--tokenizer", str(phi35_tokenizer_dir), "--out", str(base), "--hidden", "64",
                            "--layers", "2", "--heads", "4", "--intermediate", "128", "--device", "cpu"])
    from transformers import Phi3ForCausalLM

    Phi3ForCausalLM.from_pretrained(base, dtype=torch.float32).save_pretrained(base)  # fp32: snippets use dtype="auto"
    (base / "README.md").write_text("---\nlicense: mit\n---\n# a stand-in of Phi-3.5-mini\n")
    api = RecordingHfApi(root / "uploads")
    out = root / "run"
    with pytest.MonkeyPatch.context() as mp:
        api.patch(mp)
        metrics = thinking_sft.main([
            "--config", str(REPO / "recipes/configs/phi35_mini_lora.yaml"), "--model_name_or_path", str(base),
            "--dataset_path", str(REPO / "data/sample"), "--output_dir", str(out), "--max_steps", "4",
            "--learning_rate", "5e-3", "--so8t_learning_rate", "5e-2", "--warmup_steps", "0", "--logging_steps", "1",
            "--bf16", "false", "--dtype", "float32", "--use_cpu", "true", "--optim", "adamw_torch",
            "--max_length", "512", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
            "--eval_strategy", "no", "--save_strategy", "no", "--eval_generation_rows", "1",
            "--eval_max_new_tokens", "8", "--disable_tqdm", "true", "--report_to", "none",
            "--push_to_hub", "true", "--hub_model_id", REPO_ID,
        ])
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True,
                                           tokenize=True, return_dict=True)["input_ids"]
    ids = torch.tensor([prompt + TAG_IDS[:2] + tokenizer.encode(" four", add_special_tokens=False) + TAG_IDS[6:]])
    trained = PeftModel.from_pretrained(So8tPhi3ForCausalLM.from_pretrained(base, dtype=torch.float32),
                                        out / "adapter").eval()
    with torch.no_grad():
        logits = trained(ids).logits
    stage = root / "stage"
    assert main(["push", str(out), "--repo-id", REPO_ID, "--dry-run", str(stage), "--base-model", BASE_ID,
                 "--language", "en", "ja"]) == 0
    return SimpleNamespace(root=root, base=base, out=out, stage=stage, ids=ids, logits=logits, api=api,
                           metrics=metrics)
