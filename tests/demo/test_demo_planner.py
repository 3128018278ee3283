"""The demo's planner choice: ``detailpp demo --planner llm`` checks the server before the model loads, and the page
offers spaCy and the language model (tiny random SDXL, the LLM planner against the test server on 127.0.0.1)."""

from __future__ import annotations

import pytest

from detailpp.cli import main
from detailpp.demo.session import DemoInputError, DemoSession
from detailpp.parsing.llm import LLMPlanner
from tests.parsing.llm_server import MODEL, FakeLLMServer, answer
from tests.parsing.test_llm_planner import GOOD, GOOD_PLAN, PROMPT, RED_IN_BASE


def test_the_session_parses_with_the_chosen_planner(tiny_pipe):
    with FakeLLMServer([answer(GOOD), answer(RED_IN_BASE), answer(RED_IN_BASE)]) as server:
        session = DemoSession(tiny_pipe, "tiny-random", planner=LLMPlanner(MODEL, server.url))
        assert session.planners == ["spacy", "llm"]
        assert session.parse(PROMPT).to_dict() == GOOD_PLAN  # the session's planner: the model
        assert session.parse(PROMPT, planner="spacy") == tiny_pipe.decompose(PROMPT)
        fallback = session.parse(PROMPT + ".", planner="llm")
        assert fallback.notice.startswith("The language model's plan was not used")
        with pytest.raises(DemoInputError, match=r"^Planner must be one of \['spacy', 'llm'\], got 'gpt'\.$"):
            session.parse(PROMPT, planner="gpt")
    assert len(server.chats) == 3 and DemoSession(tiny_pipe).planners == ["spacy"]


def test_a_server_failure_is_one_sentence_in_the_page(tiny_pipe):
    with FakeLLMServer([]) as server:
        url = server.url
    session = DemoSession(tiny_pipe, "tiny-random", planner=LLMPlanner(MODEL, url))
    with pytest.raises(DemoInputError, match=r"^Cannot reach the language model server at "):
        session.parse(PROMPT)


def test_the_page_offers_the_planners(tiny_pipe):
    from detailpp.demo import build_demo

    with FakeLLMServer([answer(GOOD), answer(GOOD)]) as server:
        demo = build_demo(
            tiny_pipe, model_name="tiny-random", initial_prompt=PROMPT, planner=LLMPlanner(MODEL, server.url)
        )
        radios = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "detailpp-planner"]
        (parse,) = [f for f in demo.fns.values() if f.name == "on_parse"][:1]
        rows, table_prompt, _, status = parse.fn(PROMPT, "subject", "llm")
    assert len(radios) == 1 and radios[0].choices == [("spacy", "spacy"), ("llm", "llm")] and radios[0].value == "llm"
    assert table_prompt == PROMPT and status == "Parsed: 2 detail branches."
    assert rows == [
        ["base", "a car and a bench", ""],
        ["branch", "a red car and a bench", "car"],
        ["branch", "a car and a blue bench", "bench"],
    ]
    plain = build_demo(tiny_pipe, model_name="tiny-random", initial_prompt="")
    assert not [b for b in plain.blocks.values() if getattr(b, "elem_id", None) == "detailpp-planner"]


class FakePipe:
    def set_progress_bar_config(self, **kwargs) -> None:
        pass


def test_cli_demo_checks_the_server_before_loading(monkeypatch, capsys):
    import detailpp.demo
    import detailpp.models.loading

    monkeypatch.setattr(detailpp.models.loading, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    with FakeLLMServer([]) as server:
        url = server.url
    argv = ["demo", "--model", "tiny-random", "--port", "0", "--planner", "llm", "--llm-model", MODEL]
    assert main([*argv, "--llm-base-url", url]) == 2
    assert capsys.readouterr().err.startswith(f"detailpp demo: error: Cannot reach the language model server at {url}")
    built = []
    monkeypatch.setattr(detailpp.models.loading, "load_pipeline", lambda *a, **k: FakePipe())
    monkeypatch.setattr(detailpp.demo, "build_demo", lambda pipe, **k: built.append(k) or "demo")
    monkeypatch.setattr(detailpp.demo, "launch", lambda demo, host, port: None)
    with FakeLLMServer([]) as server:
        assert main([*argv, "--llm-base-url", server.url]) == 0
    assert isinstance(built[0]["planner"], LLMPlanner) and built[0]["planner"].base_url == server.url
    assert [r.path for r in server.requests] == ["/v1/models"]
