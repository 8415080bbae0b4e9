"""Prompt templates of the reasoning primitives (pluggable).

A template turns one raw task instance (from :mod:`megatron_growloop.data.synthetic`)
into a *prompt* (the text the model reads) and the *delimiter* put between the
prompt and an answer choice.  Two templates are built in:

``fill_blank`` (the paper's App. D format)::

    Fill in the blank:
    jic dqy sof uzg ewr oxw osp tkj rvw mnu jic dqy sof uzg ewr ___. ->     -> " oxw"

    Fill in blank:

    o=23
    k=3
    ...
    o=___. ->                                                               -> " 23"

``continuation`` (plain text continuation, no instruction)::

    jic dqy sof uzg ewr oxw osp tkj rvw mnu jic dqy sof uzg ewr             -> " oxw"
    o=23
    ...
    o=                                                                      -> "23"

Variable assignment comes in three surface forms (:data:`FORMS`): ``basic``
(``o=23``, the paper's), ``math`` (``Let o = 23.`` ... ``Then o = ___``) and ``code``
(``o = 23`` ... ``print(o)  # prints ___``).  A form fixes the statement and query
syntax; a template fixes the frame (instruction header, blank marker).  New
templates are registered with :func:`register_template`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

from ..data.synthetic import AssignmentInstance, CopyInstance
from ..errors import UsageError

BLANK = "{blank}"


@dataclass(frozen=True)
class AssignmentForm:
    """Surface syntax of a variable-assignment prompt.

    ``statement`` formats one assignment (``{name}``, ``{value}``; the value is a number
    or another variable's name); ``query`` formats the question and holds ``{blank}``
    where the answer goes.
    """

    name: str
    statement: str
    query: str

    def statements(self, inst: AssignmentInstance) -> str:
        return "\n".join(self.statement.format(name=n, value=v) for n, v in inst.lines)

    def query_parts(self, name: str) -> Tuple[str, str]:
        """``(text before the blank, text after it)`` of the query for variable ``name``."""
        q = self.query.replace(BLANK, "\0").format(name=name)
        before, after = q.split("\0")
        return before, after


FORMS: Dict[str, AssignmentForm] = {
    "basic": AssignmentForm("basic", "{name}={value}", "{name}={blank}"),
    "math": AssignmentForm("math", "Let {name} = {value}.", "Then {name} = {blank}"),
    "code": AssignmentForm("code", "{name} = {value}", "print({name})  # prints {blank}"),
}


class PromptTemplate:
    """Renders task instances to ``(prompt, delimiter)``; subclass to add a format.

    ``fewshot_separator`` joins the in-context examples (each ``prompt + delimiter +
    answer``) and the final prompt.
    """

    name = "base"
    fewshot_separator = "\n\n"

    def copy(self, inst: CopyInstance) -> Tuple[str, str]:  # pragma: no cover - interface
        raise NotImplementedError

    def assignment(self, inst: AssignmentInstance, form: AssignmentForm) -> Tuple[str, str]:  # pragma: no cover
        raise NotImplementedError


def _copy_words(inst: CopyInstance) -> str:
    return " ".join(list(inst.sequence) + list(inst.segment))


class FillBlankTemplate(PromptTemplate):
    """App. D of the paper: an instruction line, the task, ``___. ->``, answer after a space."""

    name = "fill_blank"
    copy_header = "Fill in the blank:\n"
    assignment_header = "Fill in blank:\n\n"
    blank = "___. ->"

    def copy(self, inst: CopyInstance) -> Tuple[str, str]:
        return f"{self.copy_header}{_copy_words(inst)} {self.blank}", " "

    def assignment(self, inst: AssignmentInstance, form: AssignmentForm) -> Tuple[str, str]:
        before, after = form.query_parts(inst.query)
        return f"{self.assignment_header}{form.statements(inst)}\n{before}{self.blank}{after}", " "


class ContinuationTemplate(PromptTemplate):
    """Plain continuation: the text up to the answer; the answer is the next word/value.

    The delimiter is the whitespace the form puts before the blank (``o=`` + ``23``,
    ``Then o =`` + `` 23``); a copy answer always follows a space.
    """

    name = "continuation"

    def copy(self, inst: CopyInstance) -> Tuple[str, str]:
        return _copy_words(inst), " "

    def assignment(self, inst: AssignmentInstance, form: AssignmentForm) -> Tuple[str, str]:
        before, _ = form.query_parts(inst.query)
        stripped = before.rstrip(" ")
        return f"{form.statements(inst)}\n{stripped}", before[len(stripped):]


TEMPLATES: Dict[str, PromptTemplate] = {}


def register_template(template: PromptTemplate) -> PromptTemplate:
    """Make ``template`` available by its ``name`` (CLI ``--template``, lm-eval export)."""
    if not template.name or not isinstance(template, PromptTemplate):
        raise UsageError(f"cannot register template {template!r}: need a named PromptTemplate")
    TEMPLATES[template.name] = template
    return template


register_template(FillBlankTemplate())
register_template(ContinuationTemplate())


def get_template(template) -> PromptTemplate:
    if isinstance(template, PromptTemplate):
        return template
    try:
        return TEMPLATES[str(template)]
    except KeyError:
        raise UsageError(
            f"unknown template {template!r}; choose one of: {', '.join(TEMPLATES)}"
        ) from None
