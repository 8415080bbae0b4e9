"""The reasoning primitives (paper App. D; Saunshi et al. 2024): 11 multiple-choice tasks.

=====================  =========================================  =========  ======
task                   what                                        choices    chance
=====================  =========================================  =========  ======
``copy_random``        copy random three-letter words              10         10 %
``copy_real``          copy real English words                     10         10 %
``va_basic_d{0,1,2}``  variable assignment, ``o=23`` lines         5          20 %
``va_math_d{0,1,2}``   variable assignment, ``Let o = 23.``        5          20 %
``va_code_d{0,1,2}``   variable assignment, ``o = 23`` + print     5          20 %
=====================  =========================================  =========  ======

Copying: a sequence of 10 distinct words, then a contiguous 5-word segment of it
(starting at position 0-4) repeated; the answer is the word that followed the
segment.  The choices are the 10 words of the sequence.

Variable assignment (depth ``d``): 5 chains; level 0 binds 5 variables to distinct
numbers 0-29, every further level assigns a fresh variable from a variable of the
previous level (shuffled); the query is a last-level variable, so it needs ``d``
hops.  The choices are the 5 chain values.

Every item is deterministic in ``(task, seed, index)``: the test instance depends
only on the task family (so ``va_basic_d1``, ``va_math_d1`` and ``va_code_d1`` show the
same assignments in different syntax, and every template and shot count uses the
same instances), and its ``k`` in-context examples are the first ``k`` of a per-item
demo stream (so 5-shot demos are a prefix of 10-shot demos).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Tuple

from ..data import synthetic
from ..errors import UsageError
from .templates import FORMS, PromptTemplate, get_template

DEFAULT_NUM_FEWSHOT = 5
DEFAULT_TEMPLATE = "fill_blank"


@dataclass(frozen=True)
class TaskSpec:
    """One reasoning primitive."""

    name: str
    family: str  # "copy" or "va"
    title: str
    real_words: bool = False
    form: Optional[str] = None  # assignment surface form
    depth: int = 0
    seq_len: int = 10
    seg_len: int = 5
    n_chains: int = 5
    max_value: int = 30

    @property
    def num_choices(self) -> int:
        return self.seq_len if self.family == "copy" else self.n_chains

    @property
    def chance(self) -> float:
        return 1.0 / self.num_choices

    @property
    def instance_key(self) -> str:
        """Items of tasks sharing this key share their underlying instances."""
        if self.family == "copy":
            return "copy_real" if self.real_words else "copy_random"
        return f"va_d{self.depth}"


def _build_tasks() -> Dict[str, TaskSpec]:
    tasks = [
        TaskSpec("copy_random", "copy", "Copying random three-letter words"),
        TaskSpec("copy_real", "copy", "Copying real words", real_words=True),
    ]
    for form in ("basic", "math", "code"):
        for d in (0, 1, 2):
            tasks.append(TaskSpec(f"va_{form}_d{d}", "va", f"Variable assignment ({form}), depth {d}",
                                  form=form, depth=d))
    return {t.name: t for t in tasks}


TASKS: Dict[str, TaskSpec] = _build_tasks()
TASK_GROUPS: Dict[str, Tuple[str, ...]] = {
    "all": tuple(TASKS),
    "copy": ("copy_random", "copy_real"),
    "va": tuple(n for n in TASKS if n.startswith("va_")),
    **{f"va_{f}": tuple(n for n in TASKS if n.startswith(f"va_{f}_")) for f in FORMS},
    **{f"va_d{d}": tuple(n for n in TASKS if n.endswith(f"_d{d}")) for d in (0, 1, 2)},
}


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise UsageError(
            f"unknown reasoning-primitive task {name!r}; choose from: {', '.join(TASKS)} "
            f"or a group: {', '.join(TASK_GROUPS)}"
        ) from None


def resolve_tasks(spec) -> List[str]:
    """Task names from ``"all"``, a group (``va_math``), or a comma-separated list of names/groups."""
    if isinstance(spec, str):
        parts = [p.strip() for p in spec.split(",") if p.strip()]
    else:
        parts = [str(p).strip() for p in spec]
    if not parts:
        raise UsageError("--tasks is empty; give 'all', a group or task names")
    out: List[str] = []
    for p in parts:
        names = TASK_GROUPS.get(p, None) or (get_task(p).name,)
        out.extend(n for n in names if n not in out)
    return out


@dataclass(frozen=True)
class Item:
    """One multiple-choice question.

    ``context`` holds the in-context examples and the question; the scored text of
    choice ``i`` is ``context + delimiter + choices[i]`` (``delimiter`` is lm-eval's
    ``target_delimiter``).  ``gold`` indexes the right choice.
    """

    task: str
    index: int
    context: str
    choices: Tuple[str, ...]
    gold: int
    delimiter: str
    num_fewshot: int
    prompt: str  # the question alone (the last part of ``context``)
    template: str = DEFAULT_TEMPLATE

    @property
    def answer(self) -> str:
        return self.choices[self.gold]

    @property
    def continuations(self) -> Tuple[str, ...]:
        return tuple(self.delimiter + c for c in self.choices)

    def requests(self) -> List[Tuple[str, str]]:
        """``(context, continuation)`` pairs, one per choice (lm-eval's request layout)."""
        return [(self.context, c) for c in self.continuations]

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["choices"] = list(self.choices)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Item":
        d = dict(d)
        d["choices"] = tuple(d["choices"])
        return cls(**d)


@dataclass(frozen=True)
class _Example:
    prompt: str
    delimiter: str
    choices: Tuple[str, ...]
    answer: str
    instance: Any  # the raw CopyInstance / AssignmentInstance


def _instance(spec: TaskSpec, rng: random.Random):
    if spec.family == "copy":
        vocab = synthetic.english_words() if spec.real_words else None
        return synthetic.copy_instance(rng, vocab, seq_len=spec.seq_len, seg_len=spec.seg_len)
    return synthetic.assignment_instance(rng, spec.depth, n_chains=spec.n_chains, max_value=spec.max_value)


def _example(spec: TaskSpec, rng: random.Random, template: PromptTemplate) -> _Example:
    inst = _instance(spec, rng)
    if spec.family == "copy":
        prompt, delim = template.copy(inst)
        choices = list(inst.sequence)
    else:
        prompt, delim = template.assignment(inst, FORMS[spec.form])
        choices = list(inst.values)
    rng.shuffle(choices)
    return _Example(prompt, delim, tuple(choices), inst.answer, inst)


def _rng(spec: TaskSpec, seed: int, stream: str, index: int) -> random.Random:
    # str seeds are hashed with SHA-512 by ``random`` (independent of PYTHONHASHSEED).
    return random.Random(f"growloop-rp|{spec.instance_key}|{int(seed)}|{stream}|{int(index)}")


def make_item(
    name: str,
    index: int,
    seed: int = 0,
    num_fewshot: int = DEFAULT_NUM_FEWSHOT,
    template=DEFAULT_TEMPLATE,
    stream: str = "test",
) -> Item:
    """Item ``index`` of task ``name`` (see the module docstring for the determinism rules).

    ``stream`` names an independent sequence of items: ``"test"`` is the evaluation set;
    fine-tuning data is drawn from another stream (``"sft"``) and is further filtered
    against the evaluation items (:mod:`megatron_growloop.eval.sft_tasks`)."""
    spec = get_task(name)
    tmpl = get_template(template)
    if int(num_fewshot) < 0:
        raise UsageError(f"--num-fewshot must be >= 0, got {num_fewshot}")
    test = _example(spec, _rng(spec, seed, stream, index), tmpl)
    demo_rng = _rng(spec, seed, "demo" if stream == "test" else f"{stream}-demo", index)
    parts = []
    for _ in range(int(num_fewshot)):
        d = _example(spec, demo_rng, tmpl)
        parts.append(d.prompt + d.delimiter + d.answer)
    parts.append(test.prompt)
    return Item(
        task=spec.name,
        index=int(index),
        context=tmpl.fewshot_separator.join(parts),
        choices=test.choices,
        gold=test.choices.index(test.answer),
        delimiter=test.delimiter,
        num_fewshot=int(num_fewshot),
        prompt=test.prompt,
        template=tmpl.name,
    )


def item_instances(name: str, index: int, seed: int = 0, num_demos: int = DEFAULT_NUM_FEWSHOT):
    """``(test instance, [demo instances])`` behind item ``index`` of task ``name``.

    The raw instances (independent of template and surface form) through the same random
    streams as :func:`make_item`, so a training corpus can hold the exact evaluation items
    out (:mod:`megatron_growloop.eval.corpus`).
    """
    spec = get_task(name)
    tmpl = get_template(DEFAULT_TEMPLATE)
    test = _example(spec, _rng(spec, seed, "test", index), tmpl).instance
    demo_rng = _rng(spec, seed, "demo", index)
    return test, [_example(spec, demo_rng, tmpl).instance for _ in range(int(num_demos))]


def generate_task(
    name: str,
    n: int,
    seed: int = 0,
    num_fewshot: int = DEFAULT_NUM_FEWSHOT,
    template=DEFAULT_TEMPLATE,
    start: int = 0,
) -> List[Item]:
    """Items ``start .. start+n-1`` of task ``name``."""
    if int(n) < 0:
        raise UsageError(f"number of items must be >= 0, got {n}")
    return [make_item(name, i, seed, num_fewshot, template) for i in range(int(start), int(start) + int(n))]
