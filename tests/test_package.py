"""The package as a whole: its public names, its layout rules (no import cycle, small files, kernels apart from
transformers, remote code that stands alone), the recipe's --help, and checkpoints saved by version 0.1."""

import ast
import subprocess
import sys

import pytest
import torch
from isolation import run_isolated
from paths import REPO
from tiny_models import TINY

import so8t_hf

PACKAGE = REPO / "so8t_hf"


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(REPO).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        yield ".".join(parts), path


def _imports(name, path, modules):
    """so8t_hf modules that `path` imports anywhere (lazy, function-level imports too: a cycle through them still
    ties two modules together); `from pkg import submodule` is an edge to the submodule only."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
    return {m for m in found if m in modules and m != name}


def test_public_names_resolve_and_all_matches_the_import_structure():
    assert sorted(so8t_hf.__all__) == sorted(n for names in so8t_hf._import_structure.values() for n in names)
    for name in so8t_hf.__all__:
        assert getattr(so8t_hf, name) is not None, name
    assert torch.ops.so8t.so8_rotate is not None  # registered by `import so8t_hf`


def test_no_import_cycle_between_library_modules():
    modules = dict(_modules())
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_small_files_and_a_small_package_root():
    too_long = {str(p.relative_to(REPO)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 500}
    assert too_long == {}
    root_modules = [p.name for p in PACKAGE.glob("*.py")]
    assert len(root_modules) <= 8, root_modules


@pytest.mark.parametrize("folder, allowed", [
    ("modeling", {"torch", "transformers", "logging", "huggingface_hub"}),
    ("ops", {"torch", "triton", "math", "os", "functools", "importlib", "__future__"}),
])
def test_modeling_and_ops_import_only_their_own_dependencies(folder, allowed):
    for path in (PACKAGE / folder).glob("*.py"):
        if path.name == "__init__.py" and folder == "modeling":
            continue  # the library's import surface, not copied into checkpoints
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and not node.level else []
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"


def test_recipe_help_shows_trl_model_config_names():
    out = subprocess.run([sys.executable, str(REPO / "recipes/thinking_sft.py"), "--help"], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    for flag in ("--use_peft", "--load_in_4bit", "--lora_target_modules", "--so8t_layers", "--tag_preset", "--max_steps"):
        assert flag in out, flag


def test_so8t_layers_has_one_grammar():
    from so8t_hf.modeling.configuration_so8t_phi3 import normalize_so8t_layers
    from so8t_hf.sft import make_parser

    assert normalize_so8t_layers("all") == normalize_so8t_layers(["all"]) == "all"
    assert normalize_so8t_layers(["0", "-1"]) == normalize_so8t_layers([0, -1]) == [0, -1]
    for bad in ("0,1", ["0", "x"], 3, [True]):
        with pytest.raises(ValueError, match="give \"all\" or a list of layer indices"):
            normalize_so8t_layers(bad)
    model_args, *_ = make_parser().parse_args_and_config(["--so8t_layers", "0", "1", "--output_dir", "unused", "--bf16", "false"])
    assert model_args.so8t_layers == [0, 1]


def test_old_config_names_still_work_and_warn():
    from so8t_hf.sft import SO8TModelConfig

    with pytest.warns(FutureWarning, match="use_peft"):
        assert SO8TModelConfig(use_lora=False).use_peft is False
    with pytest.warns(FutureWarning, match="load_in_4bit"):
        cfg = SO8TModelConfig(quantization_bits=4)
    assert cfg.load_in_4bit and cfg.use_bnb_nested_quant and not cfg.load_in_8bit
    with pytest.raises(ValueError, match="loss_mask='everything'"):
        from so8t_hf.sft import ThinkingDataConfig

        ThinkingDataConfig(loss_mask="everything")


SAVE_WITH_V01 = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from so8t_phi3_v0_1.configuration_so8t_phi3 import So8tPhi3Config
from so8t_phi3_v0_1.modeling_so8t_phi3 import So8tPhi3ForCausalLM
config = So8tPhi3Config(**eval(sys.argv[3]))
torch.manual_seed(0)
model = So8tPhi3ForCausalLM(config).eval()
gen = torch.Generator().manual_seed(1)
with torch.no_grad():
    for name, p in model.named_parameters():
        if "so8_rotation" in name:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
model.save_pretrained(sys.argv[2])
ids = torch.arange(3, 15)[None]
with torch.no_grad():
    torch.save((ids, model(ids).logits), sys.argv[2] + "/expected.pt")
"""


def test_a_checkpoint_saved_by_version_0_1_still_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    from so8t_hf import So8tPhi3ForCausalLM

    ckpt = tmp_path / "v01"
    run_isolated(SAVE_WITH_V01, str(REPO / "tests/fixtures"), str(ckpt), repr(TINY), tmp_path=tmp_path)
    ids, expected = torch.load(ckpt / "expected.pt")
    assert "so8t_hf.attention" in (ckpt / "modeling_so8t_phi3.py").read_text()  # really the 0.1 code
    for model in (So8tPhi3ForCausalLM.from_pretrained(ckpt),  # the library's classes
                  AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=True)):  # its own 0.1 code
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(ids).logits, expected, atol=1e-5, rtol=1e-5)
