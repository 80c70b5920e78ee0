"""Thinking metrics: exact values of each score, the leak check against correct and buggy
extractors, and loading the three local `evaluate` modules with the network blocked."""

import os
import re
import subprocess
import sys
import textwrap

import random

import pytest
from disguises import DISGUISE_CLASSES, generation
from disguises import SECRET as THOUGHT
from paths import REPO

from so8t_hf.thinking import extract_final, get_tag_preset, render_thinking
from so8t_hf.thinking.metrics import (
    METRIC_NAMES,
    compute_thinking_metrics,
    load_thinking_metrics,
    metric_path,
)
from so8t_hf.thinking.metrics.scoring import (
    final_exact_match,
    format_compliance,
    leaks_thinking,
    thinking_leak,
    until_turn_end,
)

GOOD = render_thinking({"task": "Add two and two.", "safety": "Harmless.", "policy": "Be brief."}, "It is 4.")
SECRET = "the hidden password is swordfish"

# Generations where a naive extractor shows thinking text; extract_final never does.
ADVERSARIAL = [
    f"<think-task>{SECRET}</think-task>\n<final>Hello.</final>",
    f"<think-task>draft: <final>{SECRET}</final></think-task>\n<final>Hi.</final>",   # final inside thinking
    f"<final>Sure.</final><think-safety>{SECRET}",                                     # unterminated thinking
    f"<think-policy>{SECRET}</think-policy>",                                           # no final at all
    f"<final>Start <think-task>{SECRET}</think-task> end</final>",                     # thinking inside final
    f"<THINK-TASK >{SECRET}</think-task><final>ok</final>",                             # odd spelling
]


def naive_regex(text: str) -> str:
    m = re.search(r"<final>(.*?)</final>", text, re.S)
    return m.group(1).strip() if m else text  # falls back to the raw text


def strip_tags(text: str) -> str:
    return re.sub(r"<[^>]*>", "", text).strip()


# ------------------------------------------------------------------------------------ scores


def test_final_exact_match_values():
    preds = [GOOD, GOOD + "<|end|>", GOOD.replace("It is 4.", "It  is\n4."), "<final>It is 4.", "It is 4."]
    refs = ["It is 4."] * 4 + ["It is 4."]
    # the unclosed final is withheld and the last has no <final>: extract_final gives "" (never the raw text)
    assert final_exact_match(preds, refs) == {"final_exact_match": 0.6}
    assert final_exact_match(preds, refs, normalize=False) == {"final_exact_match": 0.4}
    assert final_exact_match([GOOD], ["<final> It is 4. </final>"]) == {"final_exact_match": 1.0}
    assert final_exact_match([GOOD], ["it is 4."]) == {"final_exact_match": 0.0}
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        final_exact_match([GOOD, GOOD], ["x"])
    with pytest.raises(ValueError, match="no predictions to score"):
        final_exact_match([], [])


def test_format_compliance_values():
    preds = [
        GOOD,
        GOOD + "<|end|>\n<|user|>more",                         # read up to the turn end: compliant
        GOOD.replace("<think-safety>Harmless.</think-safety>\n", ""),  # missing section
        "Sure! " + GOOD,                                           # text outside tags
        GOOD.replace("</final>", ""),                              # unclosed final
    ]
    assert format_compliance(preds) == {"format_compliance": 0.4}
    assert until_turn_end("a<|end|>b</s>") == "a" and until_turn_end("a</s>b") == "a"
    r4 = get_tag_preset("reasoning4")
    r4_good = render_thinking({k: "x" for k in r4.keys}, "y", r4)
    assert format_compliance([r4_good, GOOD], tags="reasoning4") == {"format_compliance": 0.5}
    assert format_compliance([r4_good], tags=r4) == {"format_compliance": 1.0}


def test_thinking_leak_is_zero_for_extract_final_and_catches_buggy_extractors():
    # the positive grammar: a final inside a section, unterminated thinking, thinking inside the final and an
    # odd spelling withhold the final
    assert [extract_final(g) for g in ADVERSARIAL] == ["Hello.", "", "", "", "", ""]
    assert thinking_leak(ADVERSARIAL) == {"thinking_leak_rate": 0.0}
    naive = [naive_regex(g) for g in ADVERSARIAL]
    assert [leaks_thinking(g, f) for g, f in zip(ADVERSARIAL, naive)] == [False, True, False, True, True, False]
    assert thinking_leak(ADVERSARIAL, finals=naive) == {"thinking_leak_rate": 0.5}
    assert thinking_leak(ADVERSARIAL, finals=[strip_tags(g) for g in ADVERSARIAL]) == {"thinking_leak_rate": 1.0}
    with pytest.raises(ValueError, match="6 predictions but 1 finals"):
        thinking_leak(ADVERSARIAL, finals=["x"])


def test_leak_metric_sees_disguised_thinking_and_extract_final_scores_zero():
    gens = [f"{tag}{THOUGHT} plan</think-task><final>Fine.</final>" for _, tag in DISGUISE_CLASSES]
    gens += [f"<final>Start {tag}{THOUGHT} plan</think-task> end</final>" for _, tag in DISGUISE_CLASSES]
    assert thinking_leak(gens) == {"thinking_leak_rate": 0.0}
    # an extractor that knows only exact ASCII tags shows the disguised thinking: the metric catches every one
    ascii_only = [re.sub(r"<[^<>]*>", "", naive_regex(g.replace("\u2039", "<").replace("\u203a", ">"))) for g in gens]
    leaky = [leaks_thinking(g, f) for g, f in zip(gens, ascii_only)]
    assert sum(leaky) >= len(DISGUISE_CLASSES), [c for (c, _), hit in zip(DISGUISE_CLASSES * 2, leaky) if not hit]
    rng = random.Random(5)
    generated = [generation(rng)[0] for _ in range(400)]
    assert thinking_leak(generated) == {"thinking_leak_rate": 0.0}
    assert thinking_leak(generated, finals=[strip_tags(g) for g in generated])["thinking_leak_rate"] > 0.5
    assert until_turn_end("a\uff1c|end|\uff1eb") == "a"


def test_leak_definition_edges():
    # Text that is in thinking AND in the final is not thinking-only: restating is not a leak.
    both = "<think-task>It is 4.</think-task>\n<final>It is 4.</final>"
    assert not leaks_thinking(both, "It is 4.")
    # A short thinking piece counts whole; a long one by 8-character windows.
    assert leaks_thinking("<think-task>No.</think-task><final>Yes.</final>", "No.")
    assert leaks_thinking(f"<think-task>{SECRET}</think-task><final>x</final>", "x password")
    assert not leaks_thinking(f"<think-task>{SECRET}</think-task><final>x</final>", "x passwo")
    # Whitespace differences do not hide a leak; text after the turn end is not the generation.
    assert leaks_thinking(f"<think-task>{SECRET}</think-task>", SECRET.replace(" ", "\n  "))
    assert not leaks_thinking(f"<final>a</final><|end|><think-task>{SECRET}</think-task>", "a")
    # Japanese thinking text leaks by characters too.
    ja = "<think-task>利用者の住所は東京都港区です</think-task><final>了解しました。</final>"
    assert extract_final(ja) == "了解しました。" and not leaks_thinking(ja, extract_final(ja))
    assert leaks_thinking(ja, "住所は東京都港区です。了解しました。")


# ------------------------------------------------------------------------------------ evaluate


def test_evaluate_modules_load_locally_and_compute():
    metrics = load_thinking_metrics()
    assert sorted(metrics) == sorted(METRIC_NAMES)
    assert [type(m).__name__ for m in metrics.values()] == ["FinalExactMatch", "FormatCompliance", "ThinkingLeak"]
    preds = [GOOD, "<final>It is 5.</final>", ADVERSARIAL[1]]
    assert metrics["final_exact_match"].compute(predictions=preds, references=["It is 4."] * 3) == {
        "final_exact_match": 1 / 3}
    assert metrics["format_compliance"].compute(predictions=preds) == {"format_compliance": 1 / 3}
    assert metrics["thinking_leak"].compute(predictions=preds, finals=[naive_regex(p) for p in preds]) == {
        "thinking_leak_rate": 1 / 3}
    assert compute_thinking_metrics(preds, ["It is 4.", "It is 5.", ""]) == {  # the third is withheld
        "final_exact_match": 1.0, "format_compliance": 1 / 3, "thinking_leak_rate": 0.0}
    with pytest.raises(ValueError, match="unknown thinking metric 'bleu'"):
        metric_path("bleu")


BLOCKED = textwrap.dedent("""
    import socket
    attempts = []
    def refuse(*args, **kwargs):
        attempts.append(repr(args[:2]))  # recorded, in case a caller swallows the error
        raise OSError("network access attempted")
    socket.socket.connect = socket.socket.connect_ex = refuse
    socket.create_connection = socket.getaddrinfo = refuse
    from so8t_hf.thinking.metrics import load_thinking_metrics, compute_thinking_metrics
    metrics = load_thinking_metrics()
    print(sorted(metrics))
    print(compute_thinking_metrics([{good!r}], ["It is 4."]))
    {extra}
    print("network attempts:", attempts)
""")


def test_loading_attempts_no_network_even_without_offline_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", BLOCKED.format(good=GOOD, extra="")], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines() == [
        "['final_exact_match', 'format_compliance', 'thinking_leak']",
        "{'final_exact_match': 1.0, 'format_compliance': 1.0, 'thinking_leak_rate': 0.0}",
        "network attempts: []",
    ]
    assert sorted(p.name for p in (tmp_path / "modules" / "evaluate_modules" / "metrics").iterdir()
                  if p.is_dir()) == sorted(METRIC_NAMES)  # copied from the package, a fresh cache
