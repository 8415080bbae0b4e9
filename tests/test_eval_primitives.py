"""Reasoning-primitive generator, templates, metrics and reference scorers (no model needed)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from megatron_growloop.errors import UsageError
from megatron_growloop.eval import metrics, primitives, scoring
from megatron_growloop.eval.oracle import ConstantScorer, OracleScorer, RandomScorer, solve
from megatron_growloop.eval.templates import FORMS, get_template

GOLDEN = Path(__file__).parent / "data" / "eval_golden.json"
TEMPLATES = ("fill_blank", "continuation")


def _golden_items():
    return {f"{t}|{tmpl}": [it.to_dict() for it in primitives.generate_task(t, 2, seed=0, num_fewshot=1, template=tmpl)]
            for t in primitives.TASKS for tmpl in TEMPLATES}


def test_task_list_is_the_papers_eleven():
    """The 11 tasks of the paper's table: 2 copying + 3 forms x 3 depths; 10 / 5 choices."""
    assert list(primitives.TASKS) == [
        "copy_random", "copy_real",
        "va_basic_d0", "va_basic_d1", "va_basic_d2", "va_math_d0", "va_math_d1", "va_math_d2",
        "va_code_d0", "va_code_d1", "va_code_d2",
    ]
    for name, spec in primitives.TASKS.items():
        assert spec.num_choices == (10 if name.startswith("copy") else 5)
        assert math.isclose(spec.chance, 0.1 if name.startswith("copy") else 0.2)
    assert primitives.resolve_tasks("all") == list(primitives.TASKS)
    assert primitives.resolve_tasks("va_math,copy_real") == ["va_math_d0", "va_math_d1", "va_math_d2", "copy_real"]


def test_generation_is_deterministic_and_index_addressable():
    """Item i depends only on (task, seed, i): regenerating, or generating a slice, gives it back."""
    for name in primitives.TASKS:
        a = primitives.generate_task(name, 6, seed=3)
        b = primitives.generate_task(name, 6, seed=3)
        assert a == b
        assert primitives.generate_task(name, 2, seed=3, start=4) == a[4:6]
        c = primitives.generate_task(name, 6, seed=4)
        assert [x.context for x in a] != [x.context for x in c]
        assert len({x.context for x in a}) == 6


def test_golden_examples_unchanged():
    """The generator's output is frozen (tests/data/eval_golden.json): results stay comparable
    across versions.  Regenerate the file only on a deliberate format change."""
    expected = json.loads(GOLDEN.read_text())
    assert _golden_items() == expected


def test_fill_blank_format_follows_appendix_d():
    """Prompt layout of App. D: instruction line, 10 words + a repeated 5-word segment, ``___. ->``;
    ``Fill in blank:``, a blank line, ``o=23`` lines, ``o=___. ->``; answers after a space."""
    it = primitives.make_item("copy_random", 0, num_fewshot=0)
    m = re.fullmatch(r"Fill in the blank:\n((?:[a-z]{3} ){15})___\. ->", it.context)
    assert m, it.context
    words = m.group(1).split()
    start = words[:10].index(words[10])
    assert words[10:15] == words[start:start + 5] and it.answer == words[start + 5]
    assert sorted(it.choices) == sorted(words[:10]) and it.delimiter == " "
    for d in (0, 1, 2):
        it = primitives.make_item(f"va_basic_d{d}", 0, num_fewshot=0)
        lines = it.context.split("\n")
        assert lines[:2] == ["Fill in blank:", ""]
        assert len(lines) == 2 + 5 * (d + 1) + 1
        assert all(re.fullmatch(r"[a-z]=([0-9]+|[a-z])", l) for l in lines[2:-1])
        assert re.fullmatch(r"[a-z]=___\. ->", lines[-1])
        assert all(re.fullmatch(r"[0-9]+", c) for c in it.choices) and len(set(it.choices)) == 5


def test_forms_share_instances_and_differ_only_in_syntax():
    """va_basic/math/code at one depth show the same assignments (paired comparison across forms)."""
    for d in (0, 1, 2):
        items = {f: primitives.make_item(f"va_{f}_d{d}", 7, num_fewshot=2) for f in FORMS}
        assert len({(it.choices, it.gold) for it in items.values()}) == 1
        names = {f: re.findall(r"\b[a-z]\b", it.prompt.replace("Fill in blank", "")) for f, it in items.items()}
        assert names["basic"] == names["math"] == names["code"]
    math_item = primitives.make_item("va_math_d1", 0, num_fewshot=0)
    assert math_item.prompt.splitlines()[2].startswith("Let ") and "Then " in math_item.prompt
    code_item = primitives.make_item("va_code_d1", 0, num_fewshot=0, template="continuation")
    assert re.fullmatch(r"print\([a-z]\)  # prints", code_item.context.splitlines()[-1])


def test_depth_is_the_number_of_hops():
    """At depth d the queried variable is d variable-to-variable hops away from its number."""
    for d in (0, 1, 2):
        for i in range(20):
            it = primitives.make_item(f"va_basic_d{d}", i, num_fewshot=0, template="continuation")
            lines = it.context.splitlines()
            env = dict(l.split("=") for l in lines[:-1])
            var, hops = lines[-1].rstrip("="), 0
            while not env[var].isdigit():
                var, hops = env[var], hops + 1
            assert hops == d and env[var] == it.answer


def test_fewshot_examples_are_nested_and_answered():
    """k-shot demos are a prefix of (k+1)-shot demos; every demo carries its answer; the question
    is the same for every k (in-context sweeps compare like with like)."""
    sep = get_template("fill_blank").fewshot_separator
    for name in ("copy_real", "va_code_d2"):
        prev = None
        for k in range(4):
            it = primitives.make_item(name, 5, num_fewshot=k)
            assert it.context.endswith(it.prompt)
            demos = it.context[: len(it.context) - len(it.prompt)]
            if prev is not None:
                assert demos.startswith(prev)
                assert it.gold == prev_gold and it.choices == prev_choices
            prev, prev_gold, prev_choices = demos, it.gold, it.choices
            assert demos.count("->") == k
        assert demos.endswith(sep)


def test_continuation_template_has_no_instruction():
    """Plain continuation: the sequence then the repeated segment; assignments then ``x=``."""
    it = primitives.make_item("copy_random", 1, num_fewshot=0, template="continuation")
    assert re.fullmatch(r"(?:[a-z]{3} ){14}[a-z]{3}", it.context) and it.delimiter == " "
    it = primitives.make_item("va_basic_d2", 1, num_fewshot=0, template="continuation")
    assert re.fullmatch(r"[a-z]=", it.context.splitlines()[-1]) and it.delimiter == ""


@pytest.mark.parametrize("template", TEMPLATES)
def test_oracle_scores_100_percent(template):
    """An oracle that reads only the prompt text solves every item: prompts carry the needed
    information and the gold index points at the right choice."""
    res = scoring.evaluate_primitives(OracleScorer(), "all", limit=150, template=template)
    for name, r in res["results"].items():
        assert r["acc"] == 1.0 and r["acc_norm"] == 1.0, name


def test_oracle_is_not_fooled_by_wrong_gold():
    """The oracle check can fail: a corrupted gold index gives 0 accuracy."""
    items = primitives.generate_task("va_math_d2", 20)
    bad = [primitives.Item(**{**it.__dict__, "gold": (it.gold + 1) % 5}) for it in items]
    res, _ = scoring.evaluate_items(OracleScorer(), bad)
    assert res.acc == 0.0
    assert solve(items[0].context) == items[0].answer


@pytest.mark.parametrize("scorer", [ConstantScorer(), RandomScorer(seed=1)], ids=["constant", "random"])
def test_uninformed_scorers_are_at_chance(scorer):
    """A scorer that cannot tell choices apart scores at chance (10 % / 20 %): gold positions are
    uniform and no choice is favoured by the format."""
    n = 1000
    for name in ("copy_random", "copy_real", "va_basic_d0", "va_code_d2"):
        items = primitives.generate_task(name, n, seed=11)
        res, _ = scoring.evaluate_items(scorer, items)
        p = primitives.get_task(name).chance
        tol = 4 * math.sqrt(p * (1 - p) / n)
        assert abs(res.acc - p) < tol, (name, res.acc)
        assert abs(res.acc_norm - p) < tol, (name, res.acc_norm)


def test_metrics_follow_lm_eval():
    """acc = argmax of summed log-likelihood; acc_norm divides by len(choice) in characters;
    stderr = sample std (n-1) / sqrt(n); ties go to the first choice."""
    assert metrics.predictions([-2.0, -3.0], ["3", "23"]) == {"acc": 0, "acc_norm": 1}
    assert metrics.predictions([0.0, 0.0, 0.0], ["a", "b", "c"])["acc"] == 0
    vals = [1.0, 0.0, 1.0, 1.0]
    assert math.isclose(metrics.mean_stderr(vals), np.std(vals, ddof=1) / 2)


def test_score_choices_layout():
    """score_choices returns one list per item with one score per choice, in choice order."""
    items = primitives.generate_task("copy_real", 3) + primitives.generate_task("va_basic_d1", 2)
    scores = scoring.score_choices(OracleScorer(), None, items)
    assert [len(s) for s in scores] == [10, 10, 10, 5, 5]
    assert all(int(np.argmax(s)) == it.gold for s, it in zip(scores, items))


def test_bad_names_are_one_line_usage_errors():
    """Unknown task, group or template names raise a one-line UsageError naming what is allowed."""
    for call in (lambda: primitives.resolve_tasks("copy_randm"), lambda: primitives.get_task("x"),
                 lambda: primitives.generate_task("va_basic_d1", 1, template="chat")):
        with pytest.raises(UsageError) as e:
            call()
        assert "\n" not in str(e.value) and ("choose" in str(e.value))


def test_repeat_block_table_layout():
    """The markdown table puts R=1 first, then one column per (start, R>1), values in percent."""
    from megatron_growloop.eval.sweeps import repeat_block_table

    res = {"tasks": ["copy_random"], "starts": [4, 8], "repeats": [1, 2], "block_size": 4,
           "acc_norm": {"copy_random": [[0.5, 0.5], [0.25, None]], "mean": [[0.5, 0.5], [0.25, None]]},
           "stderr": {"acc_norm": {"copy_random": [[0.1, 0.1], [0.05, None]],
                                   "mean": [[None, None], [None, None]]}}}
    lines = repeat_block_table(res).splitlines()
    assert lines[0] == "| task | R=1 (model) | 4:8 R=2 | 8:12 R=2 |"
    assert lines[2] == "| copy_random | 50 ± 10 | 25 ± 5 | -- |"
    assert lines[3] == "| **mean** | 50 | 25 | -- |"
