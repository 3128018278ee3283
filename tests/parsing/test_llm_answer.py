"""The rules a language model's answer is checked by (:mod:`detailpp.parsing.llm_answer`), each with its exact
message (the one sent back to the model in the repair round)."""

from __future__ import annotations

import pytest

from detailpp.parsing.llm_answer import AnswerError, extract_json, is_subsequence, plan_from_answer, words
from detailpp.resources import load_clip_tokenizer

P = "a red car and a blue bench"


@pytest.fixture(scope="module")
def tokenizer():
    return load_clip_tokenizer()


def branch(prompt: str, subject: str, *attributes: str) -> dict:
    return {"prompt": prompt, "subject": subject, "attributes": list(attributes)}


@pytest.mark.parametrize(
    ("answer", "granularity", "message"),
    [
        (
            {"base": "a car and a bench", "branches": [branch("a red car and a bench", "car", "red")]},
            "subject",
            "the base drops blue, which no branch adds back; give each modifier to its subject's branch (or keep the "
            "word in the base when it is no modifier)",
        ),
        (
            {"base": "a car and a bench", "branches": [branch("a red car and a blue bench", "car", "red")]},
            "subject",
            "the branch for 'car': its prompt adds blue to the base, which is none of its attributes ['red']; a "
            "branch is the base plus exactly one subject's modifiers",
        ),
        (
            {"base": "a car and a bench", "branches": [branch("a red shiny car and a bench", "car", "red")]},
            "subject",
            "the branch prompt for 'car' 'a red shiny car and a bench' is not the prompt with words removed (it has "
            "words the prompt has not: shiny); copy the prompt's words",
        ),
        (
            {"base": "a bench and a car", "branches": []},
            "subject",
            "the base 'a bench and a car' is not the prompt with words removed (its words are not in the prompt's "
            "order); copy the prompt's words",
        ),
        (
            {"base": "a car and a bench", "branches": [branch("a red car and a blue bench", "car", "red", "blue")]},
            "attribute",
            "the branch for 'car' has 2 attributes; give one per branch",
        ),
        (
            {"base": "a car and a bench", "branches": [branch("a car and a bench", "car")]},
            "subject",
            "the branch for 'car' has no attributes; give only subjects that have modifiers a branch",
        ),
        (
            {"base": "a car and a bench", "branches": [branch("a car and a bench", "car", "red")]},
            "subject",
            "the branch for 'car': its prompt 'a car and a bench' lacks its attribute word(s) red",
        ),
        ([1, 2], "subject", "the answer must be a JSON object with 'base' and 'branches', got list"),
        ({"base": "a car", "branches": "x"}, "subject", "'branches' must be a list, got str"),
        ({"base": "", "branches": []}, "subject", "'base' must be a non-empty string, got \"\""),
    ],
)
def test_a_broken_rule_is_named(tokenizer, answer, granularity, message):
    with pytest.raises(AnswerError) as e:
        plan_from_answer(P, answer, granularity, tokenizer)
    assert str(e.value) == message


def test_a_subject_written_twice_is_its_kth_occurrence(tokenizer):
    prompt = "a red car next to a blue car"
    answer = {
        "base": "a car next to a car",
        "branches": [
            branch("a red car next to a car", "car", "red"),
            branch("a car next to a blue car", "car", "blue"),
        ],
    }
    plan = plan_from_answer(prompt, answer, "subject", tokenizer)
    assert [b.subject_token_indices for b in plan.branches] == [(3,), (8,)]
    answer["branches"].append(branch("a car next to a blue car", "car", "blue"))
    with pytest.raises(AnswerError, match=r"^3 branches name the subject 'car', which the prompt has fewer times"):
        plan_from_answer(prompt, answer, "subject", tokenizer)


def test_carrier_words_may_come_with_an_attribute(tokenizer):
    prompt = "The car is red and the bench is blue."
    answer = {
        "base": "The car and the bench.",
        "branches": [
            branch("The car is red and the bench.", "car", "red"),
            branch("The car and the bench is blue.", "bench", "blue"),
        ],
    }
    plan = plan_from_answer(prompt, answer, "subject", tokenizer)
    assert plan.base == "The car and the bench." and [b.subject_token_indices for b in plan.branches] == [(2,), (7,)]


def test_a_subject_beyond_the_window_is_refused(tokenizer):
    prompt = "a cat " * 40 + "and a red dog"
    answer = {"base": "a cat " * 40 + "and a dog", "branches": [branch(prompt, "dog", "red")]}
    with pytest.raises(AnswerError, match=r"^The subject 'dog' sits at CLIP tokens 84-84, beyond the text encoder's"):
        plan_from_answer(prompt, answer, "subject", tokenizer)


def test_words_and_json_extraction():
    assert words("An Old-fashioned, sky-blue car's door.") == ["a", "old-fashioned", "sky-blue", "car's", "door"]
    assert is_subsequence(["a", "c"], ["a", "b", "c"]) and not is_subsequence(["c", "a"], ["a", "b", "c"])
    assert extract_json('noise {"a": {"b": 1}} noise') == {"a": {"b": 1}}
    with pytest.raises(AnswerError, match=r"^the answer is empty; answer with the plan as a JSON object$"):
        extract_json("")
