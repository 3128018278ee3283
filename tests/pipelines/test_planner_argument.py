"""``pipe(prompt, planner=...)``: every pipeline's ``__call__`` hands the planner to the plan's parse (tiny random
SDXL and SD 1.5 on the CPU, the LLM planner against the test server on 127.0.0.1)."""

from __future__ import annotations

import pytest
import torch

from detailpp import DecompositionPlan, PlanError
from detailpp.models.tiny import build_tiny_sd_pipeline
from detailpp.parsing.llm import LLMPlanner
from tests.parsing.llm_server import MODEL, FakeLLMServer, answer
from tests.parsing.test_llm_planner import GOOD, GOOD_PLAN, PROMPT

SIZE = {"height": 64, "width": 64}


def call(pipe, **kwargs):
    return pipe(
        PROMPT, num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type="np", **SIZE, **kwargs
    )


@pytest.fixture(scope="module")
def sd15():
    return build_tiny_sd_pipeline("sd15")


@pytest.mark.parametrize("which", ["sdxl", "sd15"])
def test_the_planners_plan_is_the_one_run(request, which):
    pipe = request.getfixturevalue("tiny_pipe" if which == "sdxl" else "sd15")
    with FakeLLMServer([answer(GOOD)]) as server:
        out = call(pipe, planner=LLMPlanner(MODEL, server.url))
    assert out.plan.to_dict() == GOOD_PLAN and len(server.chats) == 1
    given = call(pipe, plan=DecompositionPlan.from_dict(GOOD_PLAN))
    assert (out.images == given.images).all()


def test_the_default_planner_is_spacy_and_a_bad_one_is_named(tiny_pipe):
    assert tiny_pipe.decompose(PROMPT) == tiny_pipe.decompose(PROMPT, planner="spacy")
    with pytest.raises(PlanError, match=r"^Unknown planner 'gpt': give 'spacy' or a planner object\.$"):
        call(tiny_pipe, planner="gpt")
