"""The batched search loop's bookkeeping, driven by a scripted generator (the loop logic only:
the real vLLM engine runs in tests/integration/test_rollout.py): masks, log-probs, one retrieval
call per round, the search cap and forced answers, invalid actions, the response budget."""

from __future__ import annotations

import pytest

from searche1_ray import trajectory
from searche1_ray.engine.search_loop import (ROW_KEYS, LoopSettings, TurnOutput, information_ids,
                                             make_tasks, run_search_loop,
                                             run_search_loop_async)


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from searche1_ray.model_store import resolve_model
    return AutoTokenizer.from_pretrained(resolve_model())


class Scripted:
    """A fake policy: question → list of turn texts. Each turn is cut at the first stop string
    the request allows (kept, like ``include_stop_str_in_output``) and at ``max_tokens``."""

    def __init__(self, tok, scripts, questions, lp=-0.5, char_tokens=False):
        self.tok = tok
        self.scripts = scripts
        self.prompt_of = {}
        for q in questions:
            p = trajectory.build_prompt(q["question"], tok)
            self.prompt_of[tuple(tok(p, add_special_tokens=False)["input_ids"])] = q["id"]
        self.calls = []
        self.lp = lp
        self.char_tokens = char_tokens

    def _qid(self, ids):
        for prompt, qid in self.prompt_of.items():
            if tuple(ids[:len(prompt)]) == prompt:
                return qid, len(prompt)
        raise AssertionError("unknown prompt")

    def __call__(self, requests):
        self.calls.append(requests)
        outs = []
        for r in requests:
            qid, plen = self._qid(r.prompt_ids)
            # the turn index = observations so far in this trajectory's context
            ctx = self.tok.decode(r.prompt_ids[plen:])
            n = sum(ctx.count(s) for s in ("</information>", "Let me try again.",
                                           "I have used all my searches"))
            script = self.scripts[qid]
            text = script(n, r) if callable(script) else script[min(n, len(script) - 1)]
            cut = [text.find(s) + len(s) for s in r.stop if s in text]
            if cut:
                text = text[:min(cut)]
            if self.char_tokens:  # a tokenisation the tokenizer itself would never produce
                ids = [i for ch in text for i in self.tok(ch, add_special_tokens=False)["input_ids"]]
            else:
                ids = self.tok(text, add_special_tokens=False)["input_ids"]
            finish = "stop"
            if len(ids) > r.max_tokens:
                ids, finish = ids[:r.max_tokens], "length"
            outs.append(TurnOutput(list(ids), [self.lp] * len(ids), finish))
        return outs


class Retriever:
    def __init__(self, text="Paris is the capital of France."):
        self.calls = []
        self.text = text

    def __call__(self, queries, topk):
        self.calls.append(list(queries))
        return [[{"document": {"id": str(i), "contents": f"\"Doc {q}\"\n{self.text}"}, "score": 1.0}
                 for i in range(topk)] for q in queries]


def _segments(row):
    """Runs of equal mask: [(mask, ids)] — the slow obvious way."""
    runs = []
    for t, m in zip(row["response_ids"], row["loss_mask"]):
        if runs and runs[-1][0] == m:
            runs[-1][1].append(t)
        else:
            runs.append((m, [t]))
    return runs


def _check_row(row, tok):
    assert tuple(row) == ROW_KEYS
    n = len(row["response_ids"])
    assert len(row["loss_mask"]) == n and len(row["logprobs"]) == n
    assert all(lp == 0.0 for lp, m in zip(row["logprobs"], row["loss_mask"]) if m == 0)
    runs = _segments(row)
    # the response text is the decoded runs, in order
    assert "".join(tok.decode(ids, skip_special_tokens=True) for _, ids in runs) == row["response"]
    return runs


QS = [{"id": "q1", "question": "What is the capital of France?", "golden_answers": ["Paris"]},
      {"id": "q2", "question": "Who wrote Hamlet?", "golden_answers": ["Shakespeare"]}]


def _run(tok, scripts, questions=QS, n=1, retriever=None, char_tokens=False, **kw):
    gen = Scripted(tok, scripts, questions, char_tokens=char_tokens)
    ret = retriever or Retriever()
    settings = LoopSettings(**{"max_searches": 4, "max_turn_tokens": 64, "max_response_tokens": 512,
                               "max_information_tokens": 200, "topk": 2, **kw})
    rows, stats = run_search_loop(make_tasks(questions, n, tok), gen, ret, tok, settings,
                                  policy_version=7)
    return rows, stats, gen, ret


def test_search_then_answer_masks_and_one_retrieval_call_per_round(tok):
    scripts = {"q1": ["<think>need facts</think><search> capital of France </search> trailing",
                      "<think>found</think><answer> Paris </answer>"],
               "q2": ["<search>Hamlet author</search>", "<answer>Marlowe</answer>"]}
    rows, stats, gen, ret = _run(tok, scripts, n=2)
    assert [(r["question_id"], r["sample_idx"]) for r in rows] == [("q1", 0), ("q1", 1),
                                                                   ("q2", 0), ("q2", 1)]
    # round 1: all four trajectories searched -> one retrieval call with four queries
    assert ret.calls == [["capital of France"] * 2 + ["Hamlet author"] * 2]
    assert stats["retrieve_calls"] == 1 and stats["rounds"] == 2
    assert len(gen.calls) == 2 and len(gen.calls[0]) == 4
    for r in rows:
        runs = _check_row(r, tok)
        assert [m for m, _ in runs] == [1, 0, 1]
        policy = [tok.decode(ids, skip_special_tokens=True) for m, ids in runs if m == 1]
        obs = tok.decode(runs[1][1])
        assert obs.startswith("\n\n<information>Doc 1(Title: Doc ") and obs.endswith("</information>\n\n")
        assert tok.decode([t for t, m in zip(r["response_ids"], r["loss_mask"]) if m],
                          skip_special_tokens=True) == "".join(policy)
        assert r["num_searches"] == 1 and r["finish_reason"] == "answer"
        assert all(lp == -0.5 for lp, m in zip(r["logprobs"], r["loss_mask"]) if m)
        assert r["policy_version"] == 7
    # the stop string cut the first turn: " trailing" never made it into the response
    assert "trailing" not in rows[0]["response"]
    assert rows[0]["answer"] == "Paris" and rows[0]["reward"] == 1.0
    assert rows[2]["answer"] == "Marlowe" and rows[2]["reward"] == 0.0
    assert rows[0]["queries"] == ["capital of France"]


def test_next_turn_prompt_is_prompt_plus_response_ids(tok):
    scripts = {"q1": ["<search>x</search>", "<answer>Paris</answer>"]}
    rows, _, gen, _ = _run(tok, scripts, questions=QS[:1], char_tokens=True)
    r = rows[0]
    second = gen.calls[1][0].prompt_ids
    # the engine's (odd, character-level) ids are kept verbatim and fed back as the context
    assert second == r["prompt_ids"] + r["response_ids"][:len(second) - len(r["prompt_ids"])]
    first_turn_ids = gen.calls and [i for ch in "<search>x</search>"
                                    for i in tok(ch, add_special_tokens=False)["input_ids"]]
    assert r["response_ids"][:len(first_turn_ids)] == first_turn_ids
    assert first_turn_ids != tok("<search>x</search>", add_special_tokens=False)["input_ids"]


def test_search_cap_forces_an_answer(tok):
    always = {"q1": lambda n, r: (f"<search>query {n}</search>" if "</search>" in r.stop
                                  else " Paris </answer>")}
    rows, stats, gen, ret = _run(tok, always, questions=QS[:1], max_searches=2)
    r = rows[0]
    _check_row(r, tok)
    assert r["num_searches"] == 2 and r["queries"] == ["query 0", "query 1"]
    assert len(ret.calls) == 2
    assert trajectory.FORCE_ANSWER_TEXT in r["response"]
    assert r["finish_reason"] == "forced_answer" and r["answer"] == "Paris" and r["reward"] == 1.0
    # the forced turn may only stop at </answer>; earlier turns at both stop strings
    assert gen.calls[-1][0].stop == ("</answer>",)
    assert all(c[0].stop == trajectory.STOP_STRINGS for c in gen.calls[:-1])
    # the third search was not executed, and the force text is masked out
    runs = _segments(r)
    assert tok.decode(runs[-2][1]) == trajectory.FORCE_ANSWER_TEXT and runs[-2][0] == 0
    assert trajectory.count_searches(r["response"]) == 3  # written, but only 2 executed


def test_zero_searches_allowed_forces_immediately(tok):
    rows, _, _, ret = _run(tok, {"q1": ["<search>a</search>", "Paris</answer>"]}, questions=QS[:1],
                           max_searches=0)
    assert ret.calls == [] and rows[0]["num_searches"] == 0
    assert rows[0]["finish_reason"] == "forced_answer" and rows[0]["reward"] == 1.0


def test_invalid_action_gets_the_hint_then_continues(tok):
    scripts = {"q1": ["I think the answer is Paris.", "<answer>Paris</answer>"],
               "q2": ["<search>   </search>", "<answer>Shakespeare</answer>"]}   # blank query
    rows, stats, _, ret = _run(tok, scripts)
    assert ret.calls == []
    assert stats["invalid_turns"] == 2
    for r in rows:
        runs = _check_row(r, tok)
        assert [m for m, _ in runs] == [1, 0, 1]
        assert tok.decode(runs[1][1]) == trajectory.INVALID_ACTION_TEXT
        assert r["finish_reason"] == "answer" and r["reward"] == 1.0


def test_endless_invalid_turns_end_in_a_forced_answer_within_the_turn_limit(tok):
    rows, stats, gen, _ = _run(tok, {"q1": lambda n, r: "hmm" if "</search>" in r.stop else "x"},
                               questions=QS[:1], max_searches=3)
    r = rows[0]
    assert len(gen.calls) == LoopSettings(max_searches=3).turn_limit == 5
    assert r["response"].count(trajectory.INVALID_ACTION_TEXT) == 3
    assert r["response"].endswith(trajectory.FORCE_ANSWER_TEXT + "x")
    assert r["finish_reason"] == "no_answer" and r["answer"] is None and r["reward"] == 0.0


def test_eos_token_is_kept_in_ids_but_not_in_text(tok):
    eos = tok.eos_token_id

    def gen(requests):
        ids = tok("<answer>Paris</answer>", add_special_tokens=False)["input_ids"]
        return [TurnOutput(ids[:-1] + [eos], [-1.0] * len(ids), "stop") for _ in requests]

    # no </answer> (replaced by EOS): invalid, then the same again, ... until forced
    rows, _ = run_search_loop(make_tasks(QS[:1], 1, tok), gen, Retriever(), tok,
                              LoopSettings(max_searches=1))
    r = rows[0]
    assert eos in r["response_ids"] and tok.eos_token not in r["response"]
    _check_row(r, tok)


def test_response_budget_caps_every_trajectory(tok):
    always = {"q1": lambda n, r: f"<think>{'long reasoning ' * 10}</think><search>q{n}</search>"}
    rows, _, gen, _ = _run(tok, always, questions=QS[:1], max_response_tokens=150,
                           max_information_tokens=60)
    r = rows[0]
    _check_row(r, tok)
    assert len(r["response_ids"]) <= 150
    assert r["finish_reason"] == "length"
    # every request asked for at most the remaining budget
    for call in gen.calls:
        for req in call:
            assert len(req.prompt_ids) - len(r["prompt_ids"]) + req.max_tokens <= 150


def test_information_block_is_cut_with_closing_tag_kept(tok):
    hits = [{"document": {"id": "1", "contents": "\"Long\"\n" + "word " * 500}, "score": 1.0}]
    ids = information_ids(tok, hits, 40)
    assert len(ids) <= 40
    text = tok.decode(ids)
    assert text.startswith("\n\n<information>Doc 1(Title: Long) word") and \
        text.endswith("</information>\n\n")
    short = information_ids(tok, hits[:0], 40)
    assert tok.decode(short) == trajectory.information_block([])


def test_length_mismatch_from_a_generator_is_an_error(tok):
    def bad(requests):
        return [TurnOutput([1, 2], [0.0], "stop") for _ in requests]
    with pytest.raises(RuntimeError, match="log-probs"):
        run_search_loop(make_tasks(QS[:1], 1, tok), bad, Retriever(), tok, LoopSettings())


def test_make_tasks_names_a_missing_field(tok):
    with pytest.raises(KeyError, match="'question'"):
        make_tasks([{"id": "x"}], 1, tok)


def test_answer_tags_in_observations_do_not_count(tok):
    # the invalid-action hint quotes "<answer> and </answer>" and a passage may hold tags too
    ret = Retriever(text="The <answer> Berlin </answer> tag.")
    scripts = {"q1": ["I am not sure.", "<search>capital</search>", "still thinking"]}
    rows, _, _, _ = _run(tok, scripts, questions=QS[:1], retriever=ret, max_searches=2)
    r = rows[0]
    assert "<answer> and </answer>" in r["response"] and "<answer> Berlin </answer>" in r["response"]
    assert r["answer"] is None and r["reward"] == 0.0


def test_a_search_whose_results_do_not_fit_is_not_counted(tok):
    rows, _, _, ret = _run(tok, {"q1": ["<search>capital</search>"]}, questions=QS[:1],
                           max_response_tokens=30, max_information_tokens=200)
    r = rows[0]
    assert len(ret.calls) == 1                      # it was asked for...
    assert r["num_searches"] == 0 and r["queries"] == []   # ...but never reached the policy
    assert r["finish_reason"] == "length" and "<information>" not in r["response"]


# --- the async schedule: same rules, no rounds -------------------------------------------------

class Stream:
    """A continuous-batching fake on top of ``Scripted``: a submitted turn is computed at once but
    only returned after as many ``step`` calls as it has tokens (plus ``delay(key)``), so turns
    finish out of order and new ones join while others run — as in vLLM's engine loop."""

    def __init__(self, scripted, delay=lambda key: 0):
        self.scripted = scripted
        self.delay = delay
        self.running: dict[int, list] = {}
        self.steps = 0
        self.max_pending = 0
        self.aborted = False

    def submit(self, key, request):
        assert key not in self.running, "a trajectory was submitted twice"
        out = self.scripted([request])[0]
        self.running[key] = [max(1, len(out.token_ids)) + self.delay(key), out]
        self.max_pending = max(self.max_pending, len(self.running))

    def step(self):
        self.steps += 1
        done = []
        for key, slot in list(self.running.items()):
            slot[0] -= 1
            if slot[0] <= 0:
                done.append((key, slot[1]))
                del self.running[key]
        return done

    def pending(self):
        return len(self.running)

    def abort(self):
        self.aborted = True
        self.running.clear()


def _run_async(tok, scripts, questions=QS, n=1, retriever=None, char_tokens=False,
               max_inflight=0, delay=lambda key: 0, **kw):
    gen = Scripted(tok, scripts, questions, char_tokens=char_tokens)
    stream = Stream(gen, delay)
    ret = retriever or Retriever()
    settings = LoopSettings(**{"max_searches": 4, "max_turn_tokens": 64, "max_response_tokens": 512,
                               "max_information_tokens": 200, "topk": 2, **kw})
    rows, stats = run_search_loop_async(make_tasks(questions, n, tok), stream, ret, tok, settings,
                                        policy_version=7, max_inflight=max_inflight)
    return rows, stats, stream, ret


SCENARIOS = {
    "search_then_answer": ({"q1": ["<think>a</think><search> capital of France </search> x",
                                   "<think>found</think><answer> Paris </answer>"],
                            "q2": ["<search>Hamlet author</search>", "<answer>Marlowe</answer>"]},
                           {"n": 3}),
    "uneven_lengths": ({"q1": lambda n, r: (f"<search>{'long ' * (3 + 5 * n)}q{n}</search>"
                                            if n < 3 else "<answer>Paris</answer>"),
                        "q2": ["<answer>Shakespeare</answer>"]}, {"n": 2}),
    "search_cap": ({"q1": lambda n, r: (f"<search>query {n}</search>" if "</search>" in r.stop
                                        else " Paris </answer>"),
                    "q2": ["hmm", "<search>a</search>", "<answer>x</answer>"]}, {"max_searches": 2}),
    "invalid_then_forced": ({"q1": lambda n, r: "hmm" if "</search>" in r.stop else "x",
                             "q2": ["<search>   </search>", "<answer>Shakespeare</answer>"]},
                            {"max_searches": 3}),
    "budget": ({"q1": lambda n, r: f"<think>{'long reasoning ' * 10}</think><search>q{n}</search>",
                "q2": ["<search>capital</search>"]},
               {"max_response_tokens": 150, "max_information_tokens": 60}),
    "results_do_not_fit": ({"q1": ["<search>capital</search>"], "q2": ["<answer>x</answer>"]},
                           {"max_response_tokens": 30, "max_information_tokens": 200}),
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_async_rows_equal_the_rounds_rows(tok, name):
    scripts, kw = SCENARIOS[name]
    rounds, rstats, _, _ = _run(tok, scripts, **kw)
    # turns of different trajectories finish at different steps (and in different orders)
    rows, stats, stream, ret = _run_async(tok, scripts, delay=lambda key: 7 * (key % 3), **kw)
    assert rows == rounds                                # every field of every row
    for key in ("policy_tokens", "observation_tokens", "invalid_turns", "forced", "queries"):
        assert stats[key] == rstats[key], key
    assert stream.pending() == 0 and not stream.aborted
    assert sum(len(c) for c in ret.calls) == stats["queries"]


def test_async_starts_at_most_max_inflight_trajectories(tok):
    scripts, kw = SCENARIOS["search_then_answer"]
    ref, _, _, _ = _run(tok, scripts, n=5)
    rows, stats, stream, _ = _run_async(tok, scripts, n=5, max_inflight=3)
    assert rows == ref
    assert stream.max_pending == 3 and stats["mean_inflight"] <= 3
    _, _, unlimited, _ = _run_async(tok, scripts, n=5)
    assert unlimited.max_pending == 10


def test_async_keeps_the_engine_stepping_while_the_retriever_works(tok):
    import threading
    import time

    # q1 searches after a few steps while q2 still writes a long turn
    scripts = {"q1": ["<search>capital</search>", "<answer>Paris</answer>"],
               "q2": [f"<think>{'a ' * 60}</think><answer>x</answer>"]}
    main = threading.get_ident()

    class Slow(Retriever):
        def __call__(self, queries, topk):
            self.threads = getattr(self, "threads", set()) | {threading.get_ident()}
            before = stream_box[0].steps
            time.sleep(0.05)
            # a call cannot see steps made after it returned: record the steps seen while asleep
            self.overlap = getattr(self, "overlap", 0) + (stream_box[0].steps - before)
            return super().__call__(queries, topk)

    stream_box = []
    ret = Slow()
    gen = Scripted(tok, scripts, QS)
    stream = Stream(gen)
    stream_box.append(stream)
    rows, stats = run_search_loop_async(make_tasks(QS, 2, tok), stream, ret, tok,
                                        LoopSettings(max_turn_tokens=64, max_response_tokens=512,
                                                     max_information_tokens=100, topk=1),
                                        policy_version=7)
    ref, _, _, _ = _run(tok, scripts, n=2, max_information_tokens=100, topk=1)
    assert rows == ref
    assert main not in ret.threads                        # retrieval ran beside the engine loop
    assert ret.overlap > 0                                # ...which kept stepping meanwhile
    assert stats["retrieve_calls"] == len(ret.calls) and stats["queries"] == 2


def test_async_errors_abort_the_engine_requests(tok):
    class Broken(Retriever):
        def __call__(self, queries, topk):
            raise ConnectionError("retriever down")

    scripts = {"q1": ["<search>x</search>"], "q2": [f"<think>{'a ' * 40}</think><answer>y</answer>"]}
    gen = Scripted(tok, scripts, QS)
    stream = Stream(gen)
    with pytest.raises(ConnectionError, match="retriever down"):
        run_search_loop_async(make_tasks(QS, 1, tok), stream, Broken(), tok, LoopSettings())
    assert stream.aborted and stream.pending() == 0

    class Bad(Stream):
        def step(self):
            return [(k, TurnOutput([1, 2], [0.0], "stop")) for k in list(self.running)]
    with pytest.raises(RuntimeError, match="log-probs"):
        run_search_loop_async(make_tasks(QS, 1, tok), Bad(gen), Retriever(), tok, LoopSettings())
