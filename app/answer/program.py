"""The answer program: a DSPy module that answers from numbered passages.

``GroundedAnswer`` is the typed contract (passages + question -> answer +
cited passage numbers). ``PassageAdapter`` renders it as a short chat prompt
that small local models follow (numbered passages, then the question) and
reads the whole completion as the answer, with ``[n]`` markers as the model's
own citations. Citations are checked after the fact by an ``attribute``
function (the server passes ColBERT MaxSim of the answer against each
passage): a marked passage is kept when it scores near the best one, and
when the model marked none that hold (a 135M model rarely writes markers, and
sometimes writes wrong ones), the passages the answer's tokens match best are
cited instead, labelled ``attribution``.

The module is testable on its own with any ``dspy.LM``; streaming uses the
same adapter, so streamed and non-streamed answers see the same prompt.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import dspy

# Small models like to open with "The answer to the question is:". One list
# of the forms serves both the regex that removes a lead-in and the prefix test
# a stream holds its start back by.
_LEAD_IN_FORMS = tuple(
    f"{the}answer{to} is"
    for the in ("the ", "")
    for to in ("", " to the question", " to this question", " to your question")
)
_LEAD_IN = re.compile(
    r"^\s*(?:" + "|".join(r"\s+".join(map(re.escape, form.split())) for form in _LEAD_IN_FORMS) + r")\s*:?[\s.:]*",
    re.IGNORECASE,
)
_MARKER_GROUP = re.compile(r"\s*\[(\d{1,3}(?:\s*,\s*\d{1,3})*)\]")


class GroundedAnswer(dspy.Signature):
    """Answer the question using only the numbered passages. Answer in one or two sentences. Cite the passages you use by their number in brackets, like [1]. If the passages do not contain the answer, say that you do not know."""

    passages: list[str] = dspy.InputField(desc="numbered context passages")
    question: str = dspy.InputField()
    answer: str = dspy.OutputField(desc="a short answer grounded in the passages")
    cited: list[int] = dspy.OutputField(desc="numbers of the passages the answer relies on")


class PassageAdapter(dspy.Adapter):
    """A plain chat rendering of :class:`GroundedAnswer` for small models.

    format: a system message with the instructions and one user message with
    the numbered passages and the question. parse: the completion is the
    answer; ``[n]`` markers become ``cited`` and are removed from the text.
    """

    def format(self, signature, demos, inputs) -> list[dict]:
        passages = "\n\n".join(f"[{i}] {text}" for i, text in enumerate(inputs["passages"], start=1))
        user = f"Passages:\n{passages}\n\nQuestion: {inputs['question']}\n\nAnswer the question in one or two sentences, using the passages."
        return [{"role": "system", "content": signature.instructions}, {"role": "user", "content": user}]

    def parse(self, signature, completion: str) -> dict:
        return {"answer": strip_markers(completion), "cited": marked_citations(completion)}


def marked_citations(text: str) -> list[int]:
    """Passage numbers the text marks as ``[n]`` or ``[n, m]``, in order, once each."""
    seen: list[int] = []
    for group in _MARKER_GROUP.findall(text):
        for number in group.split(","):
            n = int(number)
            if n not in seen:
                seen.append(n)
    return seen


def may_become_lead_in(text: str) -> bool:
    """Whether a completion's start could still grow into a lead-in ("The answer is"):
    a stream holds it back until that is decided."""
    words = " ".join(text.lower().split())
    return any(form.startswith(words) for form in _LEAD_IN_FORMS)


def without_lead_in(text: str) -> str:
    """``text`` without a lead-in such as "The answer is:" at its start."""
    return _LEAD_IN.sub("", text, count=1)


def drop_repeats(text: str) -> str:
    """The text without lines that repeat an earlier line (small models loop) and without a
    trailing line that only announces more ("Definition of X:")."""
    kept: list[str] = []
    seen: set[str] = set()
    for line in text.splitlines():
        key = " ".join(line.split()).lower()
        if key and key in seen:
            continue
        seen.add(key)
        kept.append(line)
    while len(kept) > 1 and (not kept[-1].strip() or kept[-1].rstrip().endswith(":")):
        kept.pop()
    return "\n".join(kept)


def strip_markers(text: str) -> str:
    text = re.sub(r"[ \t]+([.,;:!?])", r"\1", _MARKER_GROUP.sub("", text)).strip()
    text = drop_repeats(text).strip()
    cleaned = _LEAD_IN.sub("", text, count=1).strip()
    return cleaned[:1].upper() + cleaned[1:] if cleaned else text


@dataclass
class Citation:
    index: int  # 0-based position in the passages given to the program
    source: str  # "model": the model marked it; "attribution": matched after the fact
    score: float | None = None


@dataclass
class AnswerResult:
    answer: str
    citations: list[Citation] = field(default_factory=list)
    raw: str = ""


Attribute = Callable[[str, list[str]], Sequence[float]]


class AnswerProgram(dspy.Module):
    """Retrieved passages + question -> answer with citations.

    ``attribute(answer, passages)`` scores how much of the answer each passage
    accounts for; it is used when the model marked no valid citation. Passages
    scoring at least ``attribution_share`` of the best one are cited, best
    first, at most ``max_attributed``.
    """

    def __init__(self, attribute: Attribute | None = None, attribution_share: float = 0.9, max_attributed: int = 3):
        super().__init__()
        self.generate = dspy.Predict(GroundedAnswer)
        self.attribute = attribute
        self.attribution_share = attribution_share
        self.max_attributed = max_attributed
        self.adapter = PassageAdapter()

    def forward(self, question: str, passages: list[str]) -> dspy.Prediction:
        with dspy.context(adapter=self.adapter):
            out = self.generate(question=question, passages=passages)
        result = self.finish(out.answer, list(out.cited or []), passages)
        return dspy.Prediction(answer=result.answer, citations=result.citations)

    def messages(self, question: str, passages: list[str]) -> list[dict]:
        """The chat messages the program sends, for streaming the same prompt."""
        return self.adapter.format(GroundedAnswer, [], {"question": question, "passages": passages})

    def finish_text(self, completion: str, passages: list[str]) -> AnswerResult:
        """The result for a completion that was streamed rather than predicted."""
        parsed = self.adapter.parse(GroundedAnswer, completion)
        result = self.finish(parsed["answer"], parsed["cited"], passages)
        result.raw = completion
        return result

    def finish(self, answer: str, cited: list[int], passages: list[str]) -> AnswerResult:
        """Citations for ``answer``: the passages the model marked, kept when
        attribution confirms them (small models mark wrong numbers); else
        the passages attribution ranks highest."""
        answer = (answer or "").strip()
        marked = list(dict.fromkeys(n - 1 for n in cited if 1 <= n <= len(passages)))
        if not answer or not passages:
            return AnswerResult(answer=answer)
        if self.attribute is None:
            return AnswerResult(answer=answer, citations=[Citation(i, "model") for i in marked])
        scores = [float(s) for s in self.attribute(answer, passages)]
        bar = self.attribution_share * max(scores)
        confirmed = [Citation(i, "model", scores[i]) for i in marked if scores[i] >= bar]
        if confirmed:
            return AnswerResult(answer=answer, citations=confirmed)
        order = sorted(range(len(passages)), key=lambda i: -scores[i])
        chosen = [i for i in order if scores[i] >= bar][: self.max_attributed]
        return AnswerResult(answer=answer, citations=[Citation(i, "attribution", scores[i]) for i in chosen])
