"""A plan's validation (``detailpp.plan``): an empty base, unknown fields, too many branches and token indices that
point nowhere are refused with the reason; a branch that rewrites the prompt runs with one warning the user sees."""

from __future__ import annotations

import logging

import pytest

from detailpp.plan import MAX_BRANCHES, DecompositionPlan, PlanError, plan_rewrites, validate_plan
from detailpp.resources import load_clip_tokenizer

TOKENIZER = load_clip_tokenizer()
PLAN = {
    "prompt": "a red dog and a blue cat",
    "base": "a dog and a cat",
    "branches": [
        {"prompt": "a red dog and a cat", "subject": "dog"},
        {"prompt": "a dog and a blue cat", "subject": "cat"},
    ],
}


def validate(data: dict) -> DecompositionPlan:
    return validate_plan(DecompositionPlan.from_dict(data), TOKENIZER)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"base": ""}, "The plan's base prompt is empty; write the prompt without its details (p1)."),
        ({"base": "   "}, "The plan's base prompt is empty"),
        ({"branchs": []}, "The plan has unknown field(s) ['branchs']; a plan's fields are ['base', 'branches', "),
        (
            {"branches": [{"prompt": "a red dog and a cat", "subject": "dog", "subject_token_indices": [5]}]},
            "Branch p2's subject_token_indices [5] do not point at 'dog' in the prompt (its first occurrence is at "
            "tokens [3]); correct them, or leave them out to have them computed.",
        ),
    ],
)
def test_bad_plans_are_refused_with_the_reason(change, message):
    with pytest.raises(PlanError) as e:
        validate(PLAN | change)
    assert message in str(e.value)


def test_more_branches_than_the_limit_are_refused():
    words = "dog cat car hat cup box pen bag key bed bus cow pig fox owl egg bee".split()  # one CLIP token each
    assert len(words) == MAX_BRANCHES + 1
    prompt = ", ".join(f"red {w}" for w in words)  # 51 tokens: inside the window
    base = ", ".join(words)
    branches = [{"prompt": base.replace(w, f"red {w}", 1), "subject": w} for w in words]
    assert len(validate({"prompt": prompt, "base": base, "branches": branches[:MAX_BRANCHES]}).branches) == 16
    with pytest.raises(PlanError) as e:
        validate({"prompt": prompt, "base": base, "branches": branches})
    assert str(e.value).startswith("The plan has 17 detail branches; Detail++ runs at most 16 (each one adds to every")


def test_token_indices_choose_the_occurrence_of_a_repeated_subject():
    plan = {
        "prompt": "a red dog next to a dog",
        "base": "a dog next to a dog",
        "branches": [{"prompt": "a dog next to a red dog", "subject": "dog", "subject_token_indices": [7]}],
    }
    assert validate(plan).branches[0].subject_token_indices == (7,)


def test_a_branch_that_rewrites_the_prompt_runs_with_one_visible_warning(caplog):
    rewritten = PLAN | {
        "branches": [{"prompt": "a golden dog and a cat", "subject": "dog"}, PLAN["branches"][1]],
    }
    message = (
        "Branch p2 ('dog') adds words the prompt does not have ('golden'): it rewrites the prompt, where Detail++ "
        "expects the base prompt plus one subject's details from the prompt."
    )
    assert plan_rewrites(DecompositionPlan.from_dict(rewritten)) == [message]
    with caplog.at_level(logging.WARNING, logger="detailpp.plan"):
        for _ in range(3):  # validated before loading, after, and at every call: one warning
            validate(rewritten)
    assert [r.getMessage() for r in caplog.records] == [message]
    assert plan_rewrites(DecompositionPlan.from_dict(PLAN)) == []  # the parser's kind of plan: nothing to say
    an = {"prompt": "an old red car", "base": "An car", "branches": []}  # "a"/"an" and capitals are re-chosen
    assert plan_rewrites(DecompositionPlan.from_dict(an)) == []
