"""A Hub id without network fails fast: one request tells the Hub is out of reach (no minute of retries), then one
line with ``HF_HUB_OFFLINE=1`` as the fix; offline mode never asks."""

from __future__ import annotations

import socket

import pytest

import detailpp.hub
from detailpp.cli import main


@pytest.fixture
def unreachable_hub(monkeypatch):
    """A Hub endpoint on a local port nothing listens on: every request is refused at once."""
    from huggingface_hub import constants

    with socket.socket() as s:  # a free port, closed again: connections to it are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    detailpp.hub._probe.cache_clear()
    calls = []
    probe = detailpp.hub._probe.__wrapped__

    def counted(endpoint, timeout):
        calls.append(endpoint)
        return probe(endpoint, timeout)

    monkeypatch.setattr(detailpp.hub, "_probe", detailpp.hub.functools.lru_cache(maxsize=4)(counted))
    yield f"http://127.0.0.1:{port}", calls


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "a red circle", "--model", "nobody/nothing"],
        ["bench", "generate", "--suite", "t2i-color", "--model", "nobody/nothing"],
    ],
    ids=["generate", "bench"],
)
def test_a_hub_id_without_network_is_one_line_with_the_fix(unreachable_hub, argv, tmp_path, capsys):
    endpoint, calls = unreachable_hub
    assert main([*argv, "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"detailpp {argv[0]}: error: --model nobody/nothing: the Hugging Face Hub ({endpoint}) cannot be reached "
        "(ConnectError: "
    )
    assert err.endswith(
        "run with HF_HUB_OFFLINE=1 to use only the Hugging Face cache, connect to the network, or give a local "
        "folder.\n"
    )
    assert err.count("\n") == 1 and "Retrying" not in err and calls == [endpoint]
    assert not (tmp_path / "o").exists()


def test_the_hub_is_asked_once_per_process_and_never_offline(unreachable_hub, monkeypatch):
    endpoint, calls = unreachable_hub
    for _ in range(3):
        with pytest.raises(detailpp.hub.HubUnreachableError):
            detailpp.hub.check_hub_reachable("nobody/nothing", "--model")
    assert calls == [endpoint]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    detailpp.hub.check_hub_reachable("nobody/other", "--model")  # offline: no request, no error
    assert calls == [endpoint]


def test_a_cached_model_is_pointed_to_offline_mode(unreachable_hub, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: "/cache/model_index.json")
    with pytest.raises(detailpp.hub.HubUnreachableError) as e:
        detailpp.hub.check_hub_reachable("owner/cached", "--model")
    assert str(e.value).endswith("it is in your Hugging Face cache: run with HF_HUB_OFFLINE=1 to use the cached copy.")
