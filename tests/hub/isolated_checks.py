"""The checks of a staged so8t_hf Hub repo, as a script for a process that cannot import so8t_hf (stock
transformers + PEFT). Arguments: staged repo, base folder, expected (ids, logits) file, a JSON file of snippets
(name -> code) to run. Prints `RESULT` + a JSON dict of what it saw; the tests assert on it."""

CHECKS = r'''
import json, re, shutil, sys, warnings
sys.modules["so8t_hf"] = None  # this process cannot import the project
import torch
from huggingface_hub import ModelCard
from transformers import (AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LogitsProcessor,
                          LogitsProcessorList, Phi3ForCausalLM, pipeline)
from peft import AutoPeftModelForCausalLM, PeftModel

stage, base, expected, snippets = sys.argv[1:5]
ids, ref = torch.load(expected)
result = {}

def diff(model):
    with torch.no_grad():
        return (model.float()(ids).logits - ref).abs().max().item()

root = AutoModelForCausalLM.from_pretrained(stage, trust_remote_code=True).eval()
result["root_class"] = f"{type(root).__module__}.{type(root).__name__}"
result["root"] = diff(root)

# the snippets of the cards and of the README, as written (the repo and base ids replaced by local folders)
for name, code in json.load(open(snippets)).items():
    ns = {}
    exec(code, ns)
    if "model" in ns:
        result[name] = diff(ns["model"].eval())
    if "answer" in ns:
        result[name + ":answer_type"] = type(ns["answer"]).__name__

# stock PEFT / transformers routes on a stock Phi-3: they must not give a different model silently
shutil.copytree(f"{stage}/adapter", "adapter_local")
config = json.load(open("adapter_local/adapter_config.json"))
config["base_model_name_or_path"] = base  # the base's Hub id, here its local stand-in
json.dump(config, open("adapter_local/adapter_config.json", "w"))
routes = {
    "PeftModel(stock Phi3ForCausalLM)": lambda: PeftModel.from_pretrained(
        Phi3ForCausalLM.from_pretrained(base, dtype=torch.float32), f"{stage}/adapter"),
    "AutoPeftModelForCausalLM": lambda: AutoPeftModelForCausalLM.from_pretrained("adapter_local", dtype=torch.float32),
    "AutoModelForCausalLM(adapter)": lambda: AutoModelForCausalLM.from_pretrained("adapter_local", dtype=torch.float32),
}
for name, load in routes.items():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load().eval()
    loud = [str(w.message) for w in caught if "SO8T" in str(w.message)]
    result[name] = {"diff": diff(model), "warning": loud[0] if loud else None}

# generation stops at <|end|>: the saved generation config, used by plain generate()
tok = AutoTokenizer.from_pretrained(stage, trust_remote_code=True)
end = tok.convert_tokens_to_ids("<|end|>")
result["eos_token_id"] = GenerationConfig.from_pretrained(stage).eos_token_id
result["end_id"], result["tokenizer_eos"] = end, tok.eos_token_id

class ForceEndAt(LogitsProcessor):  # the model writes <|end|> as its 3rd token
    def __call__(self, input_ids, scores):
        if input_ids.shape[1] - prompt_len == 2:
            scores[:, :] = -1e9
            scores[:, end] = 0
        return scores

prompt = tok.apply_chat_template([{"role": "user", "content": "2+2?"}], add_generation_prompt=True,
                                 return_tensors="pt", return_dict=True)["input_ids"]
prompt_len = prompt.shape[1]
generated = root.generate(prompt, max_new_tokens=20, do_sample=False, logits_processor=LogitsProcessorList([ForceEndAt()]))
result["generated_new_tokens"] = generated.shape[1] - prompt_len

# tags stay visible after skip_special_tokens=True
answer = "<think-task>SECRET plan</think-task>\n<think-safety>ok</think-safety>\n<think-policy>short</think-policy>\n<final>Four.</final>"
answer_ids = tok.encode(answer + "<|end|>", add_special_tokens=False)
result["decoded"] = tok.decode(answer_ids, skip_special_tokens=True)
result["tag_ids"] = [tok.convert_tokens_to_ids(t) for t in ("<think-task>", "</final>")]

# pipeline("text-generation") on the root: the final only; the model's output is fixed to `answer`
def fake_generate(input_ids=None, **kwargs):
    return torch.cat([input_ids, torch.tensor([answer_ids] * input_ids.shape[0])], dim=1)

chat = pipeline("text-generation", model=stage, trust_remote_code=True)
chat.model.generate = fake_generate
result["pipeline_class"] = type(chat).__name__
result["pipeline_chat"] = chat([{"role": "user", "content": "2+2?"}])[0]["generated_text"][-1]
result["pipeline_text"] = chat("2+2?", return_full_text=False)[0]["generated_text"]
result["pipeline_raw"] = chat("2+2?", return_raw_text=True)[0]["raw_generated_text"]
result["pipeline_string"] = chat("2+2?")[0]["generated_text"]  # one user turn: the conversation + the final
answer_ids = tok.encode("<think-task>no final at all</think-task>", add_special_tokens=False)
result["pipeline_no_final"] = chat([{"role": "user", "content": "2+2?"}])[0]["generated_text"][-1]["content"]
stock = pipeline("text-generation", model=root, tokenizer=tok)  # a model object: transformers' own pipeline
stock.model.generate = fake_generate
result["stock_pipeline"] = [type(stock).__name__, stock([{"role": "user", "content": "2+2?"}])[0]["generated_text"][-1]["content"]]
greedy = pipeline("text-generation", model=stage, trust_remote_code=True)  # the real model: greedy by default
result["pipeline_greedy"] = [greedy("2+2?", max_new_tokens=12, return_raw_text=True)[0]["raw_generated_text"]
                             for _ in range(2)]
try:
    pipeline("text-generation", model=stage)
    result["pipeline_without_trust"] = "loaded"
except ValueError as err:
    result["pipeline_without_trust"] = str(err)[:1000]

cards = {}
for card in ("README.md", "adapter/README.md"):
    data = ModelCard.load(f"{stage}/{card}").data
    cards[card] = {"license": data.license, "base_model": data.base_model, "pipeline_tag": data.pipeline_tag,
                   "library_name": data.library_name, "tags": data.tags, "language": data.language,
                   "eval": {r.metric_type: r.metric_value for r in (data.eval_results or [])}}
result["cards"] = cards
print("RESULT" + json.dumps(result))
'''
