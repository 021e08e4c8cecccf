"""Trajectory protocol: prompt, action parsing on malformed output, <information> format, masks."""

from hypothesis import given, strategies as st

from searche1_ray import trajectory as T


def test_prompt_is_search_r1_instruction_plus_question():
    p = T.build_prompt("Who founded Quessa Works")
    assert p.startswith("Answer the given question.")
    assert p.endswith("Question: Who founded Quessa Works?\n")
    assert "<answer> Beijing </answer>" in p


class _ChatTok:
    chat_template = "x"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert tokenize is False and add_generation_prompt is True
        return f"<user>{messages[0]['content']}</user><assistant>"


def test_prompt_uses_chat_template_when_present():
    p = T.build_prompt("Q?", _ChatTok())
    assert p.startswith("<user>Answer the given question.") and p.endswith("</user><assistant>")
    assert T.build_prompt("Q?", _ChatTok(), use_chat_template=False) == T.question_text("Q?")


def test_parse_action_cases():
    assert T.parse_action("<think>x</think>\n<search> born Quessa </search>") == T.Action("search", "born Quessa")
    assert T.parse_action("<think>x</think><answer> Lomar </answer>") == T.Action("answer", "Lomar")
    # the tag closed last wins
    assert T.parse_action("<search>a</search> then <answer>b</answer>").kind == "answer"
    assert T.parse_action("<answer>b</answer> then <search>a</search>").kind == "search"
    # unterminated / missing / empty
    assert T.parse_action("<search> never closed").kind == "invalid"
    assert T.parse_action("").kind == "invalid"
    assert T.parse_action(None).kind == "invalid"  # type: ignore[arg-type]
    assert T.parse_action("<answer></answer>") == T.Action("answer", "")
    # several spans: the last one
    assert T.parse_action("<answer>a</answer><answer> b </answer>") == T.Action("answer", "b")
    # unicode
    assert T.parse_action("<search> Zoë Ångström 北京 </search>") == T.Action("search", "Zoë Ångström 北京")


@given(st.lists(st.sampled_from(list("<>/abc sehrnwt") + ["<search>", "</search>", "<answer>",
                                                          "</answer>", "<information>", "é"]),
                max_size=60).map("".join))
def test_parsing_never_crashes(text):
    a = T.parse_action(text)
    assert a.kind in ("search", "answer", "invalid")
    assert (a.content is None) == (a.kind == "invalid")
    assert T.count_searches(text) >= 0
    assert len(T.search_queries(text)) == T.count_searches(text)


def test_search_count_ignores_information_blocks():
    resp = ("<search> a </search>" + T.information_block([{"contents": '"X"\nsee <search> b </search>'}])
            + "<search> c </search>" + "<answer> d </answer>")
    assert T.count_searches(resp) == 2
    assert T.search_queries(resp) == ["a", "c"]


def test_information_format_matches_search_r1():
    hits = [{"document": {"id": "1", "contents": '"Quessa"\nQuessa is a city.'}, "score": 0.9},
            {"document": {"id": "2", "contents": '"Lomar Vey"\nLomar Vey was born in 1962.\nMore.'}, "score": 0.5}]
    assert T.format_information(hits) == (
        "Doc 1(Title: Quessa) Quessa is a city.\nDoc 2(Title: Lomar Vey) Lomar Vey was born in 1962.\nMore.")
    block = T.information_block(hits)
    assert block.startswith("\n\n<information>Doc 1(Title: Quessa)") and block.endswith("</information>\n\n")
    assert T.format_information([{"contents": "no title line"}]) == "Doc 1(Title: no title line) "
    assert T.split_passage('"T"\nbody') == ("T", "body")


@given(st.lists(st.tuples(st.lists(st.integers(0, 50000), max_size=6), st.booleans()), max_size=8))
def test_assemble_masks_match_a_direct_loop(segments):
    ids, mask = T.assemble(segments)
    ref_ids, ref_mask = [], []
    for seg, by_policy in segments:
        for t in seg:
            ref_ids.append(t)
            ref_mask.append(1 if by_policy else 0)
    assert (ids, mask) == (ref_ids, ref_mask)
    assert T.policy_token_ids(ids, mask) == [t for seg, p in segments if p for t in seg]


def test_policy_token_ids_rejects_misaligned():
    import pytest
    with pytest.raises(ValueError, match="3 token ids but 2 mask entries"):
        T.policy_token_ids([1, 2, 3], [1, 0])


def test_action_token_positions_are_the_query_and_answer_content():
    from searche1_ray.trajectory import action_spans, action_token_positions

    pieces = ["<think>", "a", "</think>", "<search>", " Iron", " Gate", " </search>", "\n\n",
              "<answer>", " Tom", " ", "</answer>"]
    assert action_token_positions(pieces) == [4, 5, 9]      # the blank " " is not counted
    text = "".join(pieces)
    assert [text[a:b] for a, b in action_spans(text)] == [" Iron Gate ", " Tom "]
    assert action_token_positions(["no", " tags"]) == []


# ---- answer_before_search: the OPSD failure diagnostic ---------------------------------------

_Q = "Which singer recorded the album The Pilgrim of Raven?"
_INFO = "\n\n<information>Doc 1(Title: Thyl Saidepiez) She recorded The Pilgrim of Raven.</information>\n\n"


def test_answer_named_before_the_first_search_is_flagged():
    r = ("<think>The Pilgrim of Raven was recorded by tina turner.</think>\n<search> The Pilgrim of Raven "
         "</search>" + _INFO + "<think>So Tina Turner.</think>\n<answer> Tina Turner </answer>")
    assert T.answer_before_search(r, "Tina Turner", _Q)


def test_answer_found_after_retrieval_is_not_flagged():
    r = ("<think>I need the singer.</think>\n<search> The Pilgrim of Raven </search>" + _INFO
         + "<think>Thyl Saidepiez recorded it.</think>\n<answer> Thyl Saidepiez </answer>")
    assert not T.answer_before_search(r, "Thyl Saidepiez", _Q)
    # the answer only in a later thought, or only in the first query, is not a claim before searching
    r2 = "<think>Search it.</think><search> Thyl Saidepiez albums </search>" + _INFO + "<answer> Thyl Saidepiez </answer>"
    assert not T.answer_before_search(r2, "Thyl Saidepiez", _Q)


def test_answers_from_the_question_no_search_and_partial_words_are_not_flagged():
    comparison = "Which album was released earlier, The Endless Thread or River of the Frozen Storm?"
    r = "<think>The Endless Thread or River of the Frozen Storm.</think><search> The Endless Thread </search>" + _INFO
    assert not T.answer_before_search(r + "<answer> The Endless Thread </answer>", "The Endless Thread", comparison)
    assert not T.answer_before_search("<think>Paris.</think><answer> Paris </answer>", "Paris", "Capital?")
    assert not T.answer_before_search("<think>A Parisian city.</think><search> q </search>", "Paris", "Capital?")
    assert not T.answer_before_search("<think>x</think><search> q </search>", None, "q")
    assert not T.answer_before_search("<think>x</think><search> q </search>", " ?! ", "q")
    # words split by other punctuation or spacing still match
    assert T.answer_before_search("<think>It was Saim-Mythedok.</think><search> q </search>", "Saim Mythedok", "q")
