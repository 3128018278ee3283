"""The LLM planner (:mod:`detailpp.parsing.llm`) against a real OpenAI-compatible HTTP server on 127.0.0.1 that replays
recorded answers (:mod:`tests.parsing.llm_server`): the plan it proposes, validated by the project's rules; the repair
round; the fall-back to spaCy with a notice; every server failure as one line; the cache; nothing sent elsewhere."""

from __future__ import annotations

import json
import socket
import sys

import pytest

from detailpp.parsing.llm import LLMError, LLMPlanner
from detailpp.parsing.llm_prompt import PROMPT_VERSION, SYSTEM_PROMPT, repair_message, user_message
from detailpp.parsing.plan_cache import PlanCache
from detailpp.parsing.planner import SpacyPlanner, decompose, plan_prompt, plan_prompts
from detailpp.plan import PlanError
from detailpp.resources import load_clip_tokenizer
from tests.parsing.llm_server import MODEL, FakeLLMServer, answer, completion, error

PROMPT = "a red car and a blue bench"
GOOD = {
    "base": "a car and a bench",
    "branches": [
        {"prompt": "a red car and a bench", "subject": "car", "attributes": ["red"]},
        {"prompt": "a car and a blue bench", "subject": "bench", "attributes": ["blue"]},
    ],
}
GOOD_PLAN = {
    "prompt": PROMPT,
    "base": "a car and a bench",
    "granularity": "subject",
    "branches": [
        {"prompt": "a red car and a bench", "subject": "car", "attributes": ["red"], "subject_token_indices": [3]},
        {"prompt": "a car and a blue bench", "subject": "bench", "attributes": ["blue"], "subject_token_indices": [7]},
    ],
}
#: the modifier "red" left in the base (its branch then adds nothing).
RED_IN_BASE = {
    "base": "a red car and a bench",
    "branches": [
        {"prompt": "a red car and a bench", "subject": "car", "attributes": ["red"]},
        {"prompt": "a red car and a blue bench", "subject": "bench", "attributes": ["blue"]},
    ],
}
RED_IN_BASE_ERROR = (
    "the base 'a red car and a bench' keeps the modifier(s) red of 'car'; remove every modifier from the base, and "
    "add each back in its subject's branch only"
)
MADE_UP = {
    "base": "a car and a bench",
    "branches": [
        {"prompt": "a red car and a bench", "subject": "automobile", "attributes": ["red"]},
        {"prompt": "a car and a blue bench", "subject": "bench", "attributes": ["blue"]},
    ],
}
MADE_UP_ERROR = (
    "the branch for 'automobile': its prompt 'a red car and a bench' does not contain the subject 'automobile'"
)
FALLBACK = "The language model's plan was not used ({}); the spaCy parser's plan is used instead."


@pytest.fixture(scope="module")
def tokenizer():
    return load_clip_tokenizer()


class Sleeps(list):
    """An injectable ``sleep`` that records its waits instead of waiting."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def planner(server: FakeLLMServer, **kwargs) -> LLMPlanner:
    kwargs.setdefault("sleep", Sleeps())
    kwargs.setdefault("timeout", 5.0)
    return LLMPlanner(MODEL, server.url, **kwargs)


def spacy_plan(tokenizer, prompt: str = PROMPT, granularity: str = "subject") -> dict:
    return decompose(prompt, granularity, tokenizer=tokenizer).to_dict()


# ---------------------------------------------------------------------------------------------- the plan proposed


def test_a_good_plan_is_used_with_the_projects_token_indices(tokenizer):
    proposed = json.loads(json.dumps(GOOD))
    proposed["branches"][0]["subject_token_indices"] = [42]  # never taken from the model
    with FakeLLMServer([answer(proposed)]) as server:
        plan = plan_prompt(PROMPT, planner(server), "subject", tokenizer)
    assert plan.to_dict() == GOOD_PLAN
    (request,) = server.chats
    assert request.body == {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": json.dumps({"prompt": PROMPT, "granularity": "subject"})},
        ],
        "temperature": 0,
        "seed": 0,
        "response_format": {"type": "json_schema", "json_schema": request.body["response_format"]["json_schema"]},
    }
    assert request.body["response_format"]["json_schema"]["name"] == "detail_plan"
    assert request.body["response_format"]["json_schema"]["strict"] is True


def test_decompose_and_the_top_level_function_take_the_planner(tokenizer):
    import detailpp

    with FakeLLMServer([answer(GOOD)]) as server:
        plan = detailpp.decompose(PROMPT, planner=planner(server), tokenizer=tokenizer)
    assert plan.to_dict() == GOOD_PLAN
    assert decompose(PROMPT, tokenizer=tokenizer, planner="spacy") == decompose(PROMPT, tokenizer=tokenizer)
    assert detailpp.LLMPlanner is LLMPlanner and detailpp.SpacyPlanner is SpacyPlanner


@pytest.mark.parametrize(
    "wrapped",
    [
        "Here is the plan:\n" + json.dumps(GOOD) + "\nHope this helps!",
        "```json\n" + json.dumps(GOOD, indent=2) + "\n```",
        "Sure.\n```\n" + json.dumps(GOOD) + "\n```\nDone.",
    ],
    ids=["prose", "json-fence", "bare-fence"],
)
def test_a_json_mode_answer_wrapped_in_prose_or_a_code_fence_is_read(tokenizer, wrapped):
    with FakeLLMServer([answer(wrapped)]) as server:
        plan = plan_prompt(PROMPT, planner(server), "subject", tokenizer)
    assert plan.to_dict() == GOOD_PLAN and len(server.chats) == 1


def test_a_server_without_schema_support_is_asked_in_json_mode_then_plainly(tokenizer):
    rejected = error(400, "response_format json_schema is not supported")
    script = [rejected, error(400, "response_format is not supported"), answer(GOOD), answer(GOOD)]
    with FakeLLMServer(script) as server:
        p = planner(server)
        assert plan_prompt(PROMPT, p, "subject", tokenizer).to_dict() == GOOD_PLAN
        plan_prompt("a red car and a blue bench.", p, "subject", tokenizer)  # the next prompt asks plainly at once
    formats = [r.body.get("response_format", {}).get("type") for r in server.chats]
    assert formats == ["json_schema", "json_object", None, None]


def test_a_model_without_temperature_or_seed_keeps_the_schema(tokenizer):
    temperature = error(400, "Unsupported value: 'temperature' does not support 0 with this model.")
    with FakeLLMServer([temperature, error(400, "Unknown parameter: 'seed'."), answer(GOOD)]) as server:
        assert plan_prompt(PROMPT, planner(server), "subject", tokenizer).to_dict() == GOOD_PLAN
    sent = [{k for k in ("temperature", "seed", "response_format") if k in r.body} for r in server.chats]
    assert sent == [{"temperature", "seed", "response_format"}, {"seed", "response_format"}, {"response_format"}]
    with FakeLLMServer([error(400, "bad")] * 3) as server:
        with pytest.raises(LLMError) as e:
            plan_prompt(PROMPT, planner(server), "subject", tokenizer)
    assert str(e.value) == f"The language model server at {server.url} rejected the request (400: bad)."


def test_the_attribute_granularity(tokenizer):
    prompt = "a small red car and a bench"
    proposed = {
        "base": "a car and a bench",
        "branches": [
            {"prompt": "a small car and a bench", "subject": "car", "attributes": ["small"]},
            {"prompt": "a red car and a bench", "subject": "car", "attributes": ["red"]},
        ],
    }
    with FakeLLMServer([answer(proposed)]) as server:
        plan = plan_prompt(prompt, planner(server), "attribute", tokenizer)
    assert [(b.subject, b.attributes, b.subject_token_indices) for b in plan.branches] == [
        ("car", ("small",), (4,)),
        ("car", ("red",), (4,)),
    ]
    assert json.loads(server.chats[0].body["messages"][1]["content"]) == {"prompt": prompt, "granularity": "attribute"}


# ---------------------------------------------------------------------------------------------- repair and fall-back


def test_a_modifier_left_in_the_base_gets_one_repair_round(tokenizer):
    with FakeLLMServer([answer(RED_IN_BASE), answer(GOOD)]) as server:
        plan = plan_prompt(PROMPT, planner(server), "subject", tokenizer)
    assert plan.to_dict() == GOOD_PLAN
    first, repair = server.chats
    assert repair.body["messages"] == first.body["messages"] + [
        {"role": "assistant", "content": json.dumps(RED_IN_BASE)},
        {"role": "user", "content": repair_message(RED_IN_BASE_ERROR)},
    ]
    assert repair.body["messages"][-1]["content"] == (
        f"Your plan breaks a rule: {RED_IN_BASE_ERROR}. Answer again with the corrected plan for the same prompt, as "
        "the JSON object only."
    )


def test_a_second_bad_plan_falls_back_to_spacy_with_a_notice(tokenizer, caplog):
    with FakeLLMServer([answer(RED_IN_BASE), answer(RED_IN_BASE)]) as server:
        plan = plan_prompt(PROMPT, planner(server), "subject", tokenizer)
    notice = FALLBACK.format(f"its plan broke a rule after one repair round: {RED_IN_BASE_ERROR}")
    assert plan.to_dict() == {**spacy_plan(tokenizer), "notice": notice}
    assert len(server.chats) == 2
    assert notice in caplog.text


def test_a_made_up_subject_is_sent_back_then_falls_back(tokenizer):
    with FakeLLMServer([answer(MADE_UP), answer(MADE_UP)]) as server:
        plan = plan_prompt(PROMPT, planner(server), "subject", tokenizer)
    assert server.chats[1].body["messages"][-1]["content"] == repair_message(MADE_UP_ERROR)
    assert plan.notice == FALLBACK.format(f"its plan broke a rule after one repair round: {MADE_UP_ERROR}")
    assert plan.branches == decompose(PROMPT, tokenizer=tokenizer).branches


def test_a_subject_absent_from_the_prompt_is_named(tokenizer):
    bad = {
        "base": "a car and a bench",
        "branches": [{"prompt": "a car and a blue bench", "subject": "sofa", "attributes": ["blue"]}],
    }
    with FakeLLMServer([answer(bad), answer(GOOD)]) as server:
        plan_prompt(PROMPT, planner(server), "subject", tokenizer)
    assert server.chats[1].body["messages"][-1]["content"] == repair_message(
        "the branch for 'sofa': its prompt 'a car and a blue bench' does not contain the subject 'sofa'"
    )


def test_malformed_json_twice_falls_back_with_the_reason(tokenizer):
    broken = '{"base": "a car and a bench", "branches": [{"prompt": "a red car'
    with FakeLLMServer([answer(broken), answer("I cannot produce JSON today.")]) as server:
        plan = plan_prompt(PROMPT, planner(server), "subject", tokenizer)
    first_error = f"the answer is not JSON (Unterminated string starting at, character 54): {broken!r}"
    assert server.chats[1].body["messages"][-1]["content"] == repair_message(first_error)
    reason = "the answer is not JSON (Expecting value, character 0): 'I cannot produce JSON today.'"
    assert plan.notice == FALLBACK.format(f"its plan broke a rule after one repair round: {reason}")
    assert plan.branches == decompose(PROMPT, tokenizer=tokenizer).branches


def test_a_refusal_falls_back_at_once(tokenizer):
    with FakeLLMServer([(200, completion(refusal="I can't help with that."))]) as server:
        plan = plan_prompt(PROMPT, planner(server), "subject", tokenizer)
    assert plan.notice == FALLBACK.format("the model refused: I can't help with that.")
    assert len(server.chats) == 1


def test_a_fallback_keeps_the_spacy_notice_too(tokenizer):
    prompt = "ein rotes Auto und eine blaue Bank"
    with FakeLLMServer([answer("no"), answer("no")]) as server:
        plan = plan_prompt(prompt, planner(server), "subject", tokenizer)
    assert plan.notice.startswith(
        FALLBACK.format(
            "its plan broke a rule after one repair round: the answer is not JSON (Expecting value, character 0): 'no'"
        )
        + " No detail branches"
    )
    assert plan.branches == ()


# ---------------------------------------------------------------------------------------------- the server's failures


def test_429_then_success_waits_with_backoff(tokenizer):
    sleeps = Sleeps()
    script = [error(429, "slow down"), error(503, "busy", {"Retry-After": "0.25"}), answer(GOOD)]
    with FakeLLMServer(script) as server:
        plan = plan_prompt(PROMPT, planner(server, sleep=sleeps, backoff=0.5), "subject", tokenizer)
    assert plan.to_dict() == GOOD_PLAN
    assert sleeps == [0.5, 0.25] and len(server.chats) == 3


def test_429_past_the_retries_is_one_line(tokenizer):
    sleeps = Sleeps()
    with FakeLLMServer([error(429)] * 5) as server:
        with pytest.raises(LLMError) as e:
            plan_prompt(
                PROMPT, planner(server, sleep=sleeps, retries=2, backoff=1, max_backoff=1.5), "subject", tokenizer
            )
    assert str(e.value) == (
        f"The language model server at {server.url} is rate-limiting (429) 3 time(s) in a row; wait and run again "
        "(the plans made so far are cached)."
    )
    assert sleeps == [1, 1.5] and len(server.chats) == 3


def test_a_timeout_is_one_line(tokenizer):
    with FakeLLMServer([(*answer(GOOD), {}, 1.0)]) as server:
        with pytest.raises(LLMError) as e:
            plan_prompt(PROMPT, planner(server, timeout=0.2), "subject", tokenizer)
    assert str(e.value) == (
        f"The language model server at {server.url} did not answer within 0.2 s; raise --llm-timeout, or use a "
        "smaller model."
    )


def test_401_is_one_line_and_checked_before_anything(tokenizer):
    with FakeLLMServer([error(401, "bad key")], models_status=401) as server:
        p = planner(server, api_key="sk-wrong")
        with pytest.raises(LLMError) as checked:
            p.check()
        with pytest.raises(LLMError) as asked:
            plan_prompt(PROMPT, p, "subject", tokenizer)
    expected = (
        f"The language model server at {server.url} refused the API key (401 Unauthorized); set OPENAI_API_KEY to a "
        "valid key."
    )
    assert str(checked.value) == str(asked.value) == expected
    assert server.requests[0].path == "/v1/models"
    assert {k.lower(): v for k, v in server.requests[0].headers.items()}["authorization"] == "Bearer sk-wrong"


def test_an_unknown_model_names_the_servers_models(tokenizer):
    with FakeLLMServer([error(404, "model 'nope' not found")]) as server:
        with pytest.raises(LLMError) as e:
            plan_prompt(PROMPT, LLMPlanner("nope", server.url), "subject", tokenizer)
    assert str(e.value) == (
        f"The language model server at {server.url} has no model 'nope' or no chat completions (404); check "
        f"--llm-model (the server has: {MODEL}) and that --llm-base-url ends in /v1."
    )


def test_connection_refused_is_one_line(tokenizer):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: nothing listens there
    p = LLMPlanner(MODEL, f"http://127.0.0.1:{port}/v1")
    expected = (
        f"Cannot reach the language model server at http://127.0.0.1:{port}/v1 (connection refused); start the "
        "server (e.g. `ollama serve`) or fix --llm-base-url."
    )
    with pytest.raises(LLMError) as checked:
        p.check()
    with pytest.raises(LLMError) as asked:
        plan_prompt(PROMPT, p, "subject", tokenizer)
    assert str(checked.value) == str(asked.value) == expected


def test_the_settings_are_checked_before_any_request(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(LLMError) as e:
        LLMPlanner(MODEL)
    assert str(e.value) == (
        "The LLM planner at https://api.openai.com/v1 needs an API key: set OPENAI_API_KEY (a local server needs "
        "none)."
    )
    with pytest.raises(LLMError, match=r"^The LLM planner needs a model: give --llm-model NAME"):
        LLMPlanner("  ", "http://127.0.0.1:1/v1")
    with pytest.raises(LLMError, match=r"^--llm-base-url must be an http\(s\) URL"):
        LLMPlanner(MODEL, "127.0.0.1:11434")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1/")
    assert LLMPlanner(MODEL).base_url == "http://127.0.0.1:9/v1"  # no key needed for a local server


def test_without_the_openai_package_the_line_names_the_extra(monkeypatch, tokenizer):
    monkeypatch.setitem(sys.modules, "openai", None)
    p = LLMPlanner(MODEL, "http://127.0.0.1:9/v1")
    with pytest.raises(LLMError, match=r"install it with: pip install 'detailpp\[llm\]'\.$"):
        p.check()


def test_nothing_is_sent_anywhere_but_the_configured_url(monkeypatch, tokenizer):
    connected = []
    real_connect = socket.socket.connect

    def connect(self, address):
        connected.append(address[:2])
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")  # the flag wins over the variable
    with FakeLLMServer([error(429), answer(RED_IN_BASE), answer(GOOD)]) as server:
        p = planner(server)
        p.check()
        plan_prompt(PROMPT, p, "subject", tokenizer)
    assert connected and set(connected) == {("127.0.0.1", server.port)}
    assert [r.path for r in server.requests] == ["/v1/models"] + ["/v1/chat/completions"] * 3


# ---------------------------------------------------------------------------------------------- the cache


def test_a_second_run_reads_the_cache_and_sends_nothing(tmp_path, tokenizer):
    cache = tmp_path / "llm-plans.jsonl"
    with FakeLLMServer([answer(GOOD)]) as server:
        first = plan_prompt(PROMPT, planner(server, cache=cache), "subject", tokenizer)
    (record,) = [json.loads(line) for line in cache.read_text().splitlines()]
    assert {k: record[k] for k in ("prompt", "granularity", "planner", "model", "prompt_version")} == {
        "prompt": PROMPT,
        "granularity": "subject",
        "planner": "llm",
        "model": MODEL,
        "prompt_version": PROMPT_VERSION,
    }
    with FakeLLMServer([]) as server:
        again = planner(server, cache=cache)
        again.check([PROMPT])  # all cached: not even the model list is asked for
        assert plan_prompt(PROMPT, again, "subject", tokenizer) == first
    assert server.requests == []
    with FakeLLMServer([answer(GOOD), answer(GOOD)]) as server:  # another model or granularity: asked again
        plan_prompt(PROMPT, LLMPlanner("other", server.url, cache=cache), "subject", tokenizer)
        plan_prompt(PROMPT, planner(server, cache=cache), "attribute", tokenizer)
    assert len(server.chats) == 2


def test_a_fallback_is_cached_and_a_failure_is_not(tmp_path, tokenizer, caplog):
    cache = tmp_path / "plans.jsonl"
    with FakeLLMServer([error(500), answer("x"), answer("y")]) as server:
        p = planner(server, cache=cache, retries=0)
        with pytest.raises(LLMError):
            plan_prompt(PROMPT, p, "subject", tokenizer)
        assert not cache.exists()
        fallback = plan_prompt(PROMPT, p, "subject", tokenizer)
    caplog.clear()
    with FakeLLMServer([]) as server:
        assert plan_prompt(PROMPT, planner(server, cache=cache), "subject", tokenizer) == fallback
    assert fallback.notice is not None and server.requests == []
    assert f"{fallback.notice} ({PROMPT!r}, cached)" in caplog.text


def test_a_line_cut_short_is_skipped_and_the_next_plan_starts_a_new_line(tmp_path, tokenizer, caplog):
    cache = tmp_path / "plans.jsonl"
    cache.write_text('{"key": "abc", "plan": {"prom')
    with FakeLLMServer([answer(GOOD)]) as server:
        plan_prompt(PROMPT, planner(server, cache=PlanCache(cache)), "subject", tokenizer)
    assert "line 1: not a cached plan (cut short?); skipped" in caplog.text
    lines = cache.read_text().splitlines()
    assert lines[0] == '{"key": "abc", "plan": {"prom' and json.loads(lines[1])["prompt"] == PROMPT


def test_many_prompts_are_asked_concurrently_once_each(tmp_path, tokenizer):
    prompts = [PROMPT, "a car and a bench", PROMPT]
    with FakeLLMServer([answer(GOOD), answer(GOOD)]) as server:  # two distinct prompts: two requests
        with pytest.raises(PlanError):
            plan_prompts(prompts, planner(server), "subject", tokenizer, concurrency=0)
        plans = plan_prompts([PROMPT, PROMPT, "a red car and a blue bench."], planner(server), "subject", tokenizer)
    assert [p.prompt for p in plans] == [PROMPT, PROMPT, "a red car and a blue bench."]
    assert plans[0] is plans[1] and len(server.chats) == 2
    assert plan_prompts(prompts, SpacyPlanner(), tokenizer=tokenizer) == plan_prompts(prompts, tokenizer=tokenizer)


def test_prompt_rules_apply_before_any_request(tokenizer):
    with FakeLLMServer([]) as server:
        with pytest.raises(PlanError, match="prompt-weight syntax"):
            plan_prompt("a (red:1.2) car and a bench", planner(server), "subject", tokenizer)
        with pytest.raises(PlanError, match="Unknown granularity"):
            plan_prompt(PROMPT, planner(server), "word", tokenizer)
    assert server.requests == []


def test_user_message_is_the_prompt_and_granularity():
    assert json.loads(user_message("a red car", "attribute")) == {"prompt": "a red car", "granularity": "attribute"}
