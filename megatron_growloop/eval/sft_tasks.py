"""Fine-tuning data from the reasoning primitives, disjoint from the evaluation items.

``--sft-tasks va_code_d1,va_code_d2 --sft-examples N --sft-seed S`` (the paper's §5.1 and
Fig. 8, following Saunshi et al. 2024): ``N`` examples in equal shares per task.  An example
is an evaluation-style item -- ``num_fewshot`` solved demonstrations and a question -- whose
answer is the gold choice: the prompt is the item's context and the answer is its delimiter
plus the gold answer, i.e. exactly the continuation the multiple-choice evaluation scores.

Training items come from their own stream of the generator (``stream="sft"``, seeded by
``S``: the seed varies the data set, as in the paper's three seeds), and any item whose
question equals one of the first ``heldout_items`` evaluation questions of that task
(``stream="test"``, ``heldout_seed``) is skipped, so held-out evaluation never sees a
training question (``tests/test_sft_data.py``).  Questions are also not repeated within the
training set.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Set

from ..data.sft import SFTExample
from ..errors import UsageError
from . import primitives

TRAIN_STREAM = "sft"
DEFAULT_HELDOUT_ITEMS = 1000


def heldout_questions(task: str, n: int, seed: int, num_fewshot: int, template) -> Set[str]:
    """The questions (prompts without demonstrations) of evaluation items ``0..n-1``."""
    return {primitives.make_item(task, i, seed, num_fewshot, template).prompt for i in range(int(n))}


def training_items(task: str, n: int, seed: int, num_fewshot: int, template,
                   exclude: Set[str]) -> List[primitives.Item]:
    """``n`` items of ``task`` from the training stream, none asking a question in ``exclude``
    and no question twice."""
    out: List[primitives.Item] = []
    seen = set(exclude)
    index, tries = 0, 0
    while len(out) < n:
        item = primitives.make_item(task, index, seed, num_fewshot, template, stream=TRAIN_STREAM)
        index += 1
        if item.prompt in seen:
            tries += 1
            if tries > 100 * max(1, n):
                raise UsageError(f"task {task}: cannot draw {n} distinct training questions outside the held-out set")
            continue
        seen.add(item.prompt)
        out.append(item)
    return out


def split_examples(tasks: Sequence[str], total: int) -> Dict[str, int]:
    """Equal shares of ``total`` examples per task (``total`` must divide evenly)."""
    if total < 1:
        raise UsageError(f"--sft-examples must be >= 1, got {total}")
    if total % len(tasks):
        raise UsageError(
            f"--sft-examples {total} cannot be split equally over the {len(tasks)} tasks {', '.join(tasks)} "
            f"(use a multiple of {len(tasks)})"
        )
    return {t: total // len(tasks) for t in tasks}


def sft_examples(tasks, total: int, seed: int, num_fewshot: int = 0,
                 template=primitives.DEFAULT_TEMPLATE, heldout_items: int = DEFAULT_HELDOUT_ITEMS,
                 heldout_seed: int = 0) -> List[SFTExample]:
    """``total`` training examples of the primitives ``tasks`` (a spec as for ``--tasks``)."""
    names = primitives.resolve_tasks(tasks)
    primitives.get_template(template)
    if heldout_items < 0:
        raise UsageError(f"--sft-heldout-items must be >= 0, got {heldout_items}")
    out: List[SFTExample] = []
    for task, n in split_examples(names, int(total)).items():
        exclude = heldout_questions(task, heldout_items, heldout_seed, num_fewshot, template)
        for item in training_items(task, n, seed, num_fewshot, template, exclude):
            out.append(SFTExample(item.context, item.delimiter + item.answer, f"{task}#{item.index}"))
    return out
