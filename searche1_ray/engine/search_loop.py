"""The batched multi-turn search loop (Search-R1 rollout), independent of the generation back end.

For a batch of trajectories (questions × samples), one *round* is:

    1. every unfinished trajectory asks the back end for one policy turn
       (prompt ids + response ids so far → tokens until ``</search>`` / ``</answer>``);
    2. each turn is parsed (``trajectory.parse_action``) and answered by an observation:
         answer                      → the trajectory is done (finish_reason "answer")
         search, searches < S        → the query joins this round's retrieval batch
         search, searches = S        → FORCE_ANSWER_TEXT; the next turn may only answer
         invalid (no complete tag,
           or a blank query)         → INVALID_ACTION_TEXT
       and any non-answer turn that is the last but one allowed (turn limit T = S + 2, so
       S searches + an answer + one slip) gets FORCE_ANSWER_TEXT: at most T policy turns.
    3. all queries of the round go to ``retrieve`` in ONE call; each gets its
       ``<information>`` block, cut to ``max_information_tokens`` (closing tag kept).

That is the ``rounds`` schedule (:func:`run_search_loop`): every round waits for its slowest
turn and for one retrieval call, so the batch drains as turns finish. The ``async`` schedule
(:func:`run_search_loop_async`, ``rollout.loop: async``) applies the same rules per trajectory
on a continuous-batching back end: a finished turn is parsed at once, its query joins the next
retrieval call (run beside the engine, so calls group themselves), and its next turn joins the
running batch as soon as the results are in. Both give rows of the same structure.

A forced turn (after FORCE_ANSWER_TEXT, which ends in ``<answer>``) stops only at
``</answer>``; whatever it writes ends the trajectory ("forced_answer", or "no_answer" when it
never closes the tag). The whole response — policy and observation tokens — is capped at
``max_response_tokens``: each turn gets at most the remaining budget, and an observation that
would leave no room for another turn is not appended ("length").

Token bookkeeping: the response ids are exactly the back end's output ids for policy turns
(mask 1, with their sampling log-probs) and each observation's text tokenised once (mask 0,
log-prob 0.0). The next turn's prompt is ``prompt_ids + response_ids`` — nothing is ever
re-tokenised, so training sees the very tokens that were sampled. Text fields are decoded from
the ids (special tokens skipped), so ``decode(mask-1 ids)`` is the policy's text.

Answer and reward: ``answer = extract_answer(policy text)`` where the policy text is the
response without its observations — except the forced ``…<answer>`` opener, which the forced
turn completes — so answer tags quoted by the invalid-action hint or by a retrieved passage never
count (Search-R1 scores the whole sequence and would read the hint's "<answer> and </answer>"
as an answer). r = EM(answer, golden_answers). No Ray or vLLM imports here.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from searche1_ray import rewards, trajectory

log = logging.getLogger(__name__)

FINISH_REASONS = ("answer", "forced_answer", "no_answer", "length")


@dataclass(frozen=True)
class TurnRequest:
    """One policy turn to generate."""
    prompt_ids: list[int]
    max_tokens: int
    stop: tuple[str, ...]
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class TurnOutput:
    """What the back end produced for one turn: its own token ids and per-token log-probs."""
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str = "stop"   # "stop" (stop string or EOS) or "length"
    text: str | None = None


GenerateFn = Callable[[Sequence[TurnRequest]], list[TurnOutput]]
RetrieveFn = Callable[[list[str], int], list[list[Any]]]


@dataclass(frozen=True)
class LoopSettings:
    max_searches: int = 4
    max_turn_tokens: int = 200
    max_response_tokens: int = 1024
    max_information_tokens: int = 400
    topk: int = 3
    temperature: float = 1.0
    top_p: float = 1.0
    max_turns: int = 0            # policy turns; 0 = max_searches + 2
    seed: int | None = None       # per-trajectory sampling seeds when set

    @property
    def turn_limit(self) -> int:
        return self.max_turns or (self.max_searches + 2)

    @classmethod
    def from_config(cls, rcfg, topk: int, temperature: float | None = None,
                    seed: int | None = None) -> "LoopSettings":
        return cls(max_searches=rcfg.max_searches, max_turn_tokens=rcfg.max_turn_tokens,
                   max_response_tokens=rcfg.max_response_tokens,
                   max_information_tokens=rcfg.max_information_tokens, topk=topk,
                   temperature=rcfg.temperature if temperature is None else float(temperature),
                   top_p=rcfg.top_p, seed=seed)


@dataclass
class Task:
    """One trajectory to roll out."""
    question_id: str
    sample_idx: int
    question: str
    golden_answers: list[str]
    prompt: str
    prompt_ids: list[int]


@dataclass
class _State:
    task: Task
    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    answer_view: list[str] = field(default_factory=list)   # policy text + the forced "<answer>"
    queries: list[str] = field(default_factory=list)
    num_searches: int = 0
    turns: int = 0
    forced: bool = False
    done: bool = False
    finish_reason: str = ""

    def add(self, ids: Sequence[int], text: str, by_policy: bool,
            logprobs: Sequence[float] | None = None) -> None:
        self.ids.extend(int(t) for t in ids)
        self.mask.extend([1 if by_policy else 0] * len(ids))
        self.logprobs.extend([float(x) for x in logprobs] if by_policy else [0.0] * len(ids))
        self.texts.append(text)
        if by_policy:
            self.answer_view.append(text)


def make_tasks(questions: Sequence[dict], n: int, tokenizer: Any,
               use_chat_template: bool = True) -> list[Task]:
    """``n`` tasks per question ``{"id", "question", "golden_answers"}``; the prompt is
    ``trajectory.build_prompt`` tokenised once (the chat template brings its own special
    tokens, so none are added)."""
    tasks = []
    for q in questions:
        for key in ("id", "question"):
            if key not in q:
                raise KeyError(f"rollout: a question has no '{key}' field: {q!r:.200}")
        prompt = trajectory.build_prompt(q["question"], tokenizer, use_chat_template)
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        golden = q.get("golden_answers") or []
        golden = [golden] if isinstance(golden, str) else [str(g) for g in golden]
        for s in range(n):
            tasks.append(Task(str(q["id"]), s, q["question"], golden, prompt, list(ids)))
    return tasks


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def information_ids(tokenizer: Any, hits: Sequence[Any], max_tokens: int) -> list[int]:
    """The ``<information>`` block of ``hits`` as token ids, cut to ``max_tokens`` by dropping
    passage text from the end while keeping the closing ``</information>\\n\\n``."""
    ids = _encode(tokenizer, trajectory.information_block(hits))
    if len(ids) <= max_tokens:
        return ids
    tail = _encode(tokenizer, "</information>\n\n")
    body = ids[:max(0, max_tokens - len(tail))]
    return body + tail


def _seed(settings: LoopSettings, task: Task, turn: int) -> int | None:
    if settings.seed is None:
        return None
    import zlib
    return zlib.crc32(f"{settings.seed}/{task.question_id}/{task.sample_idx}/{turn}".encode())


class _Turns:
    """The per-trajectory rules of the loop, shared by both schedules: what a trajectory asks the
    back end next, what a finished turn does to it, what its search results do to it."""

    def __init__(self, tokenizer: Any, settings: LoopSettings):
        self.tok = tokenizer
        self.s = settings
        self.invalid_ids = _encode(tokenizer, trajectory.INVALID_ACTION_TEXT)
        self.force_ids = _encode(tokenizer, trajectory.FORCE_ANSWER_TEXT)
        self.stats: dict[str, float] = {
            "rounds": 0, "generate_s": 0.0, "retrieve_s": 0.0, "retrieve_calls": 0,
            "queries": 0, "policy_tokens": 0, "observation_tokens": 0, "invalid_turns": 0,
            "forced": 0}

    def room(self, st: _State) -> int:
        return self.s.max_response_tokens - len(st.ids)

    def request(self, st: _State) -> TurnRequest:
        s = self.s
        return TurnRequest(prompt_ids=st.task.prompt_ids + st.ids,
                           max_tokens=min(s.max_turn_tokens, self.room(st)),
                           stop=("</answer>",) if st.forced else trajectory.STOP_STRINGS,
                           temperature=s.temperature, top_p=s.top_p,
                           seed=_seed(s, st.task, st.turns))

    def observe(self, st: _State, ids: list[int]) -> bool:
        # an observation is appended only if a policy turn still fits after it
        if len(ids) >= self.room(st):
            st.done, st.finish_reason = True, "length"
            return False
        st.add(ids, _decode(self.tok, ids), by_policy=False)
        self.stats["observation_tokens"] += len(ids)
        return True

    def force(self, st: _State) -> None:
        st.forced = True
        self.stats["forced"] += 1
        self.observe(st, self.force_ids)
        if not st.done:
            st.answer_view.append(st.texts[-1])

    def take_turn(self, st: _State, out: TurnOutput) -> str | None:
        """Apply one generated turn; returns the search query when the trajectory now waits for
        the retriever, else None (it is done, or its next turn can be requested at once)."""
        s = self.s
        ids = list(out.token_ids)
        lps = list(out.logprobs)
        if len(lps) != len(ids):
            raise RuntimeError(f"rollout: {len(ids)} tokens but {len(lps)} log-probs from the "
                               "generator (ask for the sampled token's log-prob)")
        text = _decode(self.tok, ids)
        st.add(ids, text, by_policy=True, logprobs=lps)
        st.turns += 1
        self.stats["policy_tokens"] += len(ids)
        action = trajectory.parse_action(text)
        if st.forced:
            st.done = True
            st.finish_reason = "forced_answer" if "</answer>" in text else (
                "length" if self.room(st) <= 0 else "no_answer")
            return None
        if action.kind == "answer":
            st.done, st.finish_reason = True, "answer"
            return None
        if self.room(st) <= 0:
            st.done, st.finish_reason = True, "length"
            return None
        last_turn = st.turns >= s.turn_limit - 1
        if action.kind == "search" and action.content:
            if st.num_searches < s.max_searches and not last_turn:
                return action.content
            self.force(st)
            return None
        self.stats["invalid_turns"] += 1
        if last_turn:
            self.force(st)
        else:
            self.observe(st, self.invalid_ids)
        return None

    def take_hits(self, st: _State, query: str, hits: Sequence[Any]) -> None:
        # a search counts once its results are in the context (not when they did not fit)
        if self.observe(st, information_ids(self.tok, hits, self.s.max_information_tokens)):
            st.num_searches += 1
            st.queries.append(query)

    def retrieve(self, retrieve: RetrieveFn, queries: list[str]) -> list[list[Any]]:
        t0 = time.perf_counter()
        hits = retrieve(queries, self.s.topk)
        self.stats["retrieve_s"] += time.perf_counter() - t0
        self.stats["retrieve_calls"] += 1
        self.stats["queries"] += len(queries)
        if len(hits) != len(queries):
            raise RuntimeError(f"rollout: the retriever returned {len(hits)} hit lists for "
                               f"{len(queries)} queries")
        return hits


def run_search_loop(tasks: Sequence[Task], generate: GenerateFn, retrieve: RetrieveFn,
                    tokenizer: Any, settings: LoopSettings, policy_version: int = 0
                    ) -> tuple[list[dict], dict[str, float]]:
    """Roll out every task to the end in synchronous rounds; return (rows in task order, stats).

    ``generate`` gets all pending turns of a round at once (one engine call per round);
    ``retrieve(queries, topk)`` gets all queries of a round at once. Rows follow the rollout
    row contract (DESIGN / team brief): ids, text, loss mask, log-probs, searches, reward…
    """
    states = [_State(t) for t in tasks]
    turns = _Turns(tokenizer, settings)
    stats = turns.stats
    while True:
        active = [st for st in states if not st.done]
        if not active:
            break
        stats["rounds"] += 1
        requests = [turns.request(st) for st in active]
        t0 = time.perf_counter()
        outputs = generate(requests)
        stats["generate_s"] += time.perf_counter() - t0
        if len(outputs) != len(requests):
            raise RuntimeError(f"rollout: the generator returned {len(outputs)} outputs for "
                               f"{len(requests)} requests")
        searching: list[tuple[_State, str]] = []
        for st, out in zip(active, outputs):
            query = turns.take_turn(st, out)
            if query is not None:
                searching.append((st, query))
        if searching:
            hits = turns.retrieve(retrieve, [q for _, q in searching])
            for (st, q), h in zip(searching, hits):
                turns.take_hits(st, q, h)
    rows = [_row(st, policy_version) for st in states]
    return rows, stats


class TurnStream(Protocol):
    """A back end that takes turns one at a time and runs them in one continuous batch (vLLM's
    engine loop): ``submit`` queues a turn under a key, ``step`` advances the batch once and
    returns the turns that finished, ``pending`` counts the turns not yet returned, ``abort``
    drops them all."""

    def submit(self, key: int, request: TurnRequest) -> None: ...
    def step(self) -> list[tuple[int, TurnOutput]]: ...
    def pending(self) -> int: ...
    def abort(self) -> None: ...


def run_search_loop_async(tasks: Sequence[Task], stream: TurnStream, retrieve: RetrieveFn,
                          tokenizer: Any, settings: LoopSettings, policy_version: int = 0,
                          max_inflight: int = 0) -> tuple[list[dict], dict[str, float]]:
    """Roll out every task to the end with no rounds; same rows and rules as
    :func:`run_search_loop`.

    Each trajectory runs its own turn → search → turn sequence: a finished turn is parsed at
    once; a search query joins the next retrieval call, which runs in a helper thread while the
    engine keeps stepping (queries that arrive meanwhile wait for the following call, so calls
    batch themselves); the trajectory's next turn enters the running batch as soon as its
    results are in. At most ``max_inflight`` trajectories are started at a time (0 = all), the
    others start as those finish. ``stats["rounds"]`` counts engine steps here.
    """
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    states = [_State(t) for t in tasks]
    turns = _Turns(tokenizer, settings)
    stats = turns.stats
    waiting = deque(range(len(states)))
    live = 0                                    # started, not done
    inflight_sum = 0                            # Σ over engine steps of the turns in it
    queued: list[tuple[int, str]] = []          # searches waiting for the next retrieval call
    running = None                              # (future, [(key, query)]) of the call in flight
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="retrieve")

    def submit(key: int) -> None:
        stream.submit(key, turns.request(states[key]))

    def finished(key: int) -> None:
        nonlocal live
        if states[key].done:
            live -= 1
        else:
            submit(key)

    try:
        while True:
            while waiting and (max_inflight <= 0 or live < max_inflight):
                key = waiting.popleft()
                live += 1
                submit(key)
            if running is None and queued:
                batch, queued = queued, []
                running = (pool.submit(turns.retrieve, retrieve, [q for _, q in batch]), batch)
            if running is not None and (running[0].done() or stream.pending() == 0):
                future, batch = running
                running = None
                for (key, q), h in zip(batch, future.result()):
                    turns.take_hits(states[key], q, h)
                    finished(key)
                continue
            if stream.pending() == 0:
                if live == 0 and not waiting:
                    break
                raise RuntimeError(f"rollout: {live} trajectories neither in the engine nor "
                                   "waiting for the retriever (a bug in the loop)")
            stats["rounds"] += 1
            inflight_sum += stream.pending()
            t0 = time.perf_counter()
            done = stream.step()
            stats["generate_s"] += time.perf_counter() - t0
            for key, out in done:
                query = turns.take_turn(states[key], out)
                if query is not None:
                    queued.append((key, query))
                else:
                    finished(key)
    except BaseException:
        stream.abort()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    stats["mean_inflight"] = inflight_sum / max(1, stats["rounds"])
    rows = [_row(st, policy_version) for st in states]
    return rows, stats


def _row(st: _State, policy_version: int) -> dict:
    t = st.task
    response = "".join(st.texts)
    answer = rewards.extract_answer("".join(st.answer_view))
    return {"question_id": t.question_id, "sample_idx": t.sample_idx, "question": t.question,
            "golden_answers": list(t.golden_answers), "prompt": t.prompt, "response": response,
            "prompt_ids": list(t.prompt_ids), "response_ids": st.ids, "loss_mask": st.mask,
            "logprobs": st.logprobs, "num_searches": st.num_searches, "queries": st.queries,
            "answer": answer, "reward": rewards.exact_match(answer, t.golden_answers),
            "finish_reason": st.finish_reason, "policy_version": int(policy_version)}


ROW_KEYS = ("question_id", "sample_idx", "question", "golden_answers", "prompt", "response",
            "prompt_ids", "response_ids", "loss_mask", "logprobs", "num_searches", "queries",
            "answer", "reward", "finish_reason", "policy_version")
