"""``--planner llm`` on the command line (decompose, generate, bench generate, bench plans) against the test server on
127.0.0.1: the plan the server proposed with the project's token indices, the fall-back notice, one line per
failure before any model loads, the plan cache in the output or run folder, the planner in the records."""

from __future__ import annotations

import json
import socket

import pytest

from detailpp.cli import main
from detailpp.parsing.llm_prompt import PROMPT_VERSION
from tests.parsing.llm_server import MODEL, FakeLLMServer, answer
from tests.parsing.test_llm_planner import GOOD, GOOD_PLAN, PROMPT, RED_IN_BASE, RED_IN_BASE_ERROR

FAST = ["--model", "tiny-random", "--steps", "1", "--height", "64", "--width", "64", "--quiet"]


def llm(server: FakeLLMServer) -> list[str]:
    return ["--planner", "llm", "--llm-base-url", server.url, "--llm-model", MODEL]


def refused_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


@pytest.fixture
def no_load(monkeypatch):
    """The model must not be loaded: every check runs before."""
    import detailpp.models.loading

    monkeypatch.setattr(detailpp.models.loading, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))


def test_decompose_prints_the_servers_plan_with_the_projects_indices(capsys):
    with FakeLLMServer([answer(GOOD)]) as server:
        assert main(["decompose", PROMPT, *llm(server), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == GOOD_PLAN


def test_decompose_falls_back_to_spacy_with_a_notice(capsys):
    with FakeLLMServer([answer(RED_IN_BASE), answer(RED_IN_BASE)]) as server:
        assert main(["decompose", PROMPT, *llm(server), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["notice"] == (
        f"The language model's plan was not used (its plan broke a rule after one repair round: {RED_IN_BASE_ERROR}); "
        "the spaCy parser's plan is used instead."
    )
    assert [b["subject"] for b in plan["branches"]] == ["car", "bench"]


def test_decompose_compare_shows_both_plans(capsys):
    proposed = {  # "blue" kept in the base: a valid plan that differs from spaCy's
        "base": "a car and a blue bench",
        "branches": [{"prompt": "a red car and a blue bench", "subject": "car", "attributes": ["red"]}],
    }
    with FakeLLMServer([answer(proposed), answer(proposed)]) as server:
        assert main(["decompose", PROMPT, *llm(server), "--compare"]) == 0
        assert main(["decompose", PROMPT, *llm(server), "--compare", "--json"]) == 0
    table, data = capsys.readouterr().out.split("\n{", 1)
    assert table.splitlines() == [
        f"prompt     {PROMPT}",
        "",
        "          spacy                                 llm (test-model)",
        "base      a car and a bench                     a car and a blue bench",
        "branch 1  car [red]: a red car and a bench      car [red]: a red car and a blue bench",
        "branch 2  bench [blue]: a car and a blue bench",
        "",
        "the plans differ",
    ]
    data = json.loads("{" + data)
    assert set(data) == {"spacy", "llm"} and data["llm"]["base"] == "a car and a blue bench"


def test_decompose_file_asks_once_per_prompt_and_caches(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\n{PROMPT}.\n{PROMPT}\n")
    cache = tmp_path / "cache.jsonl"
    argv = ["decompose", "--file", str(prompts), "--llm-cache", str(cache), "--concurrency", "2"]
    with FakeLLMServer([answer(GOOD), answer(GOOD)]) as server:
        assert main([*argv, *llm(server)]) == 0
    first = capsys.readouterr().out.splitlines()
    assert len(server.chats) == 2 and len(first) == 3
    assert json.loads(first[0]) == GOOD_PLAN and json.loads(first[1])["prompt"] == f"{PROMPT}."
    with FakeLLMServer([]) as server:
        assert main([*argv, *llm(server)]) == 0
    assert capsys.readouterr().out.splitlines() == first and server.requests == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["decompose", PROMPT, "--llm-model", "m"],
            "--llm-model choose the language model of --planner llm; add --planner llm.",
        ),
        (
            ["decompose", PROMPT, "--compare"],
            "--compare shows spaCy's plan beside a language model's: add --planner llm and --llm-model",
        ),
        (
            ["decompose", PROMPT, "--planner", "llm", "--llm-base-url", "http://127.0.0.1:9/v1"],
            "The LLM planner needs a model: give --llm-model NAME (e.g. gpt-4o-mini on OpenAI, llama3.1 on Ollama).",
        ),
    ],
)
def test_decompose_flag_errors_are_one_line(capsys, argv, message):
    assert main(argv) == 2
    assert capsys.readouterr().err == f"detailpp decompose: error: {message}\n"


def test_a_server_failure_is_one_line(capsys):
    url = refused_url()
    assert main(["decompose", PROMPT, "--planner", "llm", "--llm-base-url", url, "--llm-model", MODEL]) == 2
    assert capsys.readouterr().err == (
        f"detailpp decompose: error: Cannot reach the language model server at {url} (connection refused); start the "
        "server (e.g. `ollama serve`) or fix --llm-base-url.\n"
    )


def test_generate_fails_before_the_model_loads(tmp_path, capsys, no_load):
    url = refused_url()
    argv = ["generate", PROMPT, *FAST, "--output-dir", str(tmp_path / "out")]
    assert main([*argv, "--planner", "llm", "--llm-base-url", url, "--llm-model", MODEL]) == 2
    assert "error: Cannot reach the language model server at" in capsys.readouterr().err
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(GOOD_PLAN))
    assert main([*argv, "--plan", str(plan), "--planner", "llm", "--llm-model", MODEL]) == 2
    assert capsys.readouterr().err.endswith(
        "error: --plan gives the plan itself; --planner parses a prompt: give one of them.\n"
    )


def test_generate_uses_the_models_plan_and_records_the_planner(tmp_path):
    out = tmp_path / "out"
    with FakeLLMServer([answer(GOOD)]) as server:
        assert main(["generate", PROMPT, *FAST, "--output-dir", str(out), *llm(server)]) == 0
    (sidecar,) = out.glob("*.json")
    settings = json.loads(sidecar.read_text())
    assert settings["plan"] == GOOD_PLAN
    assert settings["planner"] == {"planner": "llm", "model": MODEL, "prompt_version": PROMPT_VERSION}
    assert json.loads((out / "llm-plans.jsonl").read_text())["plan"] == GOOD_PLAN
    with FakeLLMServer([]) as server:  # the second run reads the cached plan: not one request
        assert main(["generate", PROMPT, *FAST, "--seed", "1", "--output-dir", str(out), *llm(server)]) == 0
    assert server.requests == []


def test_bench_generate_takes_the_planner(tmp_path, capsys):
    common = ["--suite", "t2i-color", "--max-prompts", "1", "--images-per-prompt", "1", "--model", "tiny-random"]
    common += ["--steps", "1", "--height", "64", "--width", "64", "--device", "cpu", "--quiet"]
    prompt = "a green bench and a blue bowl"
    proposed = {
        "base": "a bench and a bowl",
        "branches": [
            {"prompt": "a green bench and a bowl", "subject": "bench", "attributes": ["green"]},
            {"prompt": "a bench and a blue bowl", "subject": "bowl", "attributes": ["blue"]},
        ],
    }
    out = tmp_path / "run"
    with FakeLLMServer([answer(proposed)]) as server:
        assert main(["bench", "generate", "--output-dir", str(out), *common, *llm(server)]) == 0
    identity = json.loads((out / "run.json").read_text())
    assert identity["planner"] == {"planner": "llm", "model": MODEL, "prompt_version": PROMPT_VERSION}
    (record,) = [json.loads(line) for line in (out / "llm-plans.jsonl").read_text().splitlines()]
    assert record["prompt"] == prompt and record["plan"]["base"] == "a bench and a bowl"
    assert [r.path for r in server.requests] == ["/v1/models", "/v1/chat/completions"]
    with FakeLLMServer([]) as server:  # resumed: everything is made and cached, nothing is asked
        assert main(["bench", "generate", "--output-dir", str(out), *common, *llm(server)]) == 0
    assert server.requests == []
    capsys.readouterr()
    for extra, message in [
        (["--plans", str(tmp_path / "p.jsonl")], "--plans and --planner llm both give the plans: use one of them."),
        (["--method", "sdxl"], "--planner applies to --method detailpp only."),
    ]:
        assert main(["bench", "generate", "--output-dir", str(out), *common, *llm(server), *extra]) == 2
        assert capsys.readouterr().err == f"detailpp bench: error: {message}\n"


def test_bench_plans_takes_the_planner(tmp_path):
    plans = tmp_path / "plans.jsonl"
    proposed = {"base": "a bench and a bowl", "branches": []}
    with FakeLLMServer([answer(proposed)]) as server:
        argv = ["bench", "plans", "--suite", "t2i-color", "--max-prompts", "1", "--output", str(plans)]
        assert main([*argv, *llm(server)]) == 0
    assert json.loads(plans.read_text()) == {
        "prompt": "a green bench and a blue bowl",
        "base": "a bench and a bowl",
        "granularity": "subject",
        "branches": [],
    }
