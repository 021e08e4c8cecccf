"""The agent's text protocol: Search-R1 prompt, action parsing, <information> blocks, token masks.

A trajectory is the prompt followed by a *response* made of alternating segments:

    policy   : <think>…</think><search> query </search>          (mask 1, the model wrote it)
    observer : \n\n<information>Doc 1(Title: T) text …</information>\n\n   (mask 0, retrieved)
    policy   : <think>…</think><answer> X </answer>               (mask 1)

Only mask-1 tokens enter a loss (GRPO, OPSD, warm start). Parsing never raises on malformed
model output: unterminated or missing tags give ``None`` / an ``invalid`` action.
No Ray, vLLM or torch imports here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

# The Search-R1 instruction (Jin et al. 2025), used unchanged by Search-E1.
INSTRUCTION = (
    "Answer the given question. You must conduct reasoning inside <think> and </think> first "
    "every time you get new information. After reasoning, if you find you lack some knowledge, "
    "you can call a search engine by <search> query </search> and it will return the top "
    "searched results between <information> and </information>. You can search as many times "
    "as your want. If you find no further external knowledge needed, you can directly provide "
    "the answer inside <answer> and </answer>, without detailed illustrations. For example, "
    "<answer> Beijing </answer>."
)

STOP_STRINGS = ("</search>", "</answer>")

# Observation appended (mask 0) when a turn ends with neither a search nor an answer.
INVALID_ACTION_TEXT = (
    "\nMy previous action is invalid. If I want to search, I should put the query between "
    "<search> and </search>. If I want to give the final answer, I should put the answer "
    "between <answer> and </answer>. Let me try again.\n"
)

# Observation appended (mask 0) once the search budget is spent: the model must answer now.
FORCE_ANSWER_TEXT = "\n\nI have used all my searches. My final answer is: <answer>"

_SEARCH_RE = re.compile(r"<search>(.*?)</search>", re.DOTALL)
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_INFO_RE = re.compile(r"<information>(.*?)</information>", re.DOTALL)


def question_text(question: str) -> str:
    """The user message: instruction followed by the question (Search-R1 layout)."""
    q = question.strip()
    if q and q[-1] != "?":
        q += "?"
    return f"{INSTRUCTION} Question: {q}\n"


def build_prompt(question: str, tokenizer: Any = None, use_chat_template: bool = True) -> str:
    """The full prompt string the policy continues.

    With a tokenizer that has a chat template (instruct models) the user message is wrapped in
    it with the generation prompt appended; otherwise the plain text is returned.
    """
    user = question_text(question)
    if use_chat_template and tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
    return user


@dataclass(frozen=True)
class Action:
    """What one policy turn asked for: ``search`` (content = query), ``answer`` (content =
    answer text) or ``invalid`` (content = None)."""

    kind: str
    content: str | None = None


def parse_action(turn_text: str) -> Action:
    """Classify the text the policy wrote in one turn (generation stopped at a stop string or
    a length limit). The *last* complete tag pair decides, and whichever of ``</search>`` /
    ``</answer>`` closes last wins, like Search-R1's postprocessing."""
    text = turn_text or ""
    searches = list(_SEARCH_RE.finditer(text))
    answers = list(_ANSWER_RE.finditer(text))
    last_search = searches[-1] if searches else None
    last_answer = answers[-1] if answers else None
    if last_answer and (not last_search or last_answer.end() >= last_search.end()):
        return Action("answer", last_answer.group(1).strip())
    if last_search:
        return Action("search", last_search.group(1).strip())
    return Action("invalid", None)


def information_texts(response: str) -> list[str]:
    """The retrieved text inside each ``<information>…</information>`` block of a response."""
    return _INFO_RE.findall(response)


def shorten_information(response: str, keep: float) -> str:
    """The response with the text inside every ``<information>`` block cut to its first ``keep``
    share (0..1; " …" marks a cut): the retrieved part shrinks, what the policy wrote stays whole."""
    keep = min(1.0, max(0.0, keep))

    def cut(m: re.Match) -> str:
        inner = m.group(1)
        if keep >= 1.0:
            return m.group(0)
        return "<information>" + inner[: int(len(inner) * keep)].rstrip() + " …</information>"

    return _INFO_RE.sub(cut, response)


def strip_information(response: str) -> str:
    """The response with every retrieved ``<information>`` block removed (what the policy wrote,
    plus any observer hints)."""
    return _INFO_RE.sub("", response or "")


def count_searches(response: str) -> int:
    """Number of complete ``<search>…</search>`` calls the policy made in a response (searches
    quoted inside retrieved ``<information>`` blocks are not counted)."""
    return len(_SEARCH_RE.findall(strip_information(response)))


def search_queries(response: str) -> list[str]:
    """The queries of every complete search call of a response, in order."""
    return [m.strip() for m in _SEARCH_RE.findall(strip_information(response))]


_THINK_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_WORDS_RE = re.compile(r"\w+")


def answer_before_search(response: str, answer: str | None, question: str) -> bool:
    """Whether the policy named its final answer in its thinking *before its first search*, when
    the question itself does not contain it: a claim made before any evidence was retrieved (a
    guess, or a hallucination when it is wrong). False when the response never searched or gave
    no answer. Matching is on whole words, case-insensitive ("Paris" is not in "Parisian").

    The diagnostic of the OPSD failure seen on this testbed: the teacher reads the reference, so
    at the student's first thought it already predicts the answer, and distilling that teaches
    the student to state an answer it cannot know yet (bench/ablation.py)."""
    response = response or ""
    first = _SEARCH_RE.search(response)
    words = _WORDS_RE.findall(answer or "")
    if first is None or not words:
        return False
    thought = " ".join(_THINK_RE.findall(response[: first.start()]))
    pattern = re.compile(r"\b" + r"\W+".join(map(re.escape, words)) + r"\b", re.IGNORECASE)
    return bool(pattern.search(thought)) and not pattern.search(question or "")


_ACTION_RE = {"search": _SEARCH_RE, "answer": _ANSWER_RE}


def action_spans(text: str, kinds: Sequence[str] = ("search", "answer")) -> list[tuple[int, int]]:
    """Character spans of the *content* of every ``<search>…</search>`` and/or
    ``<answer>…</answer>`` (``kinds``) in ``text`` (the actions; tags excluded), in order."""
    spans = [(m.start(1), m.end(1)) for k in kinds for m in _ACTION_RE[k].finditer(text)]
    return sorted(spans)


def action_token_positions(pieces: list[str], kinds: Sequence[str] = ("search", "answer")) -> list[int]:
    """Indices of the tokens (given as their decoded texts, in order) that overlap an action
    span (of ``kinds``) of their concatenation with at least one non-blank character."""
    text = "".join(pieces)
    spans = action_spans(text, kinds)
    out, pos = [], 0
    for i, piece in enumerate(pieces):
        a, b = pos, pos + len(piece)
        pos = b
        if any(text[max(a, s_):min(b, e)].strip() for s_, e in spans):
            out.append(i)
    return out


def split_passage(contents: str) -> tuple[str, str]:
    """wiki-18 ``contents`` is ``"Title"\\ntext``: return (title without quotes, text)."""
    head, _, body = (contents or "").partition("\n")
    return head.strip().strip('"'), body.strip()


def _passage_contents(doc: Any) -> str:
    # accepts a retriever hit {"document": {...}, "score": s}, a corpus row {"contents": ...},
    # or a bare string
    if isinstance(doc, str):
        return doc
    if "document" in doc:
        doc = doc["document"]
    return str(doc.get("contents", ""))


def format_information(docs: Iterable[Any]) -> str:
    """Search-R1's passage list: one line per passage, ``Doc i(Title: T) text``."""
    lines = []
    for i, doc in enumerate(docs, start=1):
        title, text = split_passage(_passage_contents(doc))
        lines.append(f"Doc {i}(Title: {title}) {text}")
    return "\n".join(lines)


def information_block(docs: Iterable[Any]) -> str:
    """The observation appended after a search turn (mask 0)."""
    return f"\n\n<information>{format_information(docs).strip()}</information>\n\n"


def assemble(segments: Sequence[tuple[Sequence[int], bool]]) -> tuple[list[int], list[int]]:
    """Concatenate response segments ``(token_ids, written_by_policy)`` into token ids and the
    loss mask (1 = policy wrote the token, 0 = retrieved or injected by the environment)."""
    ids: list[int] = []
    mask: list[int] = []
    for seg_ids, by_policy in segments:
        ids.extend(int(t) for t in seg_ids)
        mask.extend([1 if by_policy else 0] * len(seg_ids))
    return ids, mask


def policy_token_ids(ids: Sequence[int], mask: Sequence[int]) -> list[int]:
    """The tokens the policy wrote (mask 1), in order."""
    if len(ids) != len(mask):
        raise ValueError(f"trajectory: {len(ids)} token ids but {len(mask)} mask entries")
    return [int(t) for t, m in zip(ids, mask) if m]
