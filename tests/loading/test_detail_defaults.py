"""A model's recommended Detail++ settings (``detail_config.json``) from a Hub id and into a pushed folder, offline.

A Hub id's file is fetched with the real ``hf_hub_download`` from a fake Hugging Face cache in ``tmp_path`` (the
layout of ``huggingface_hub.file_download``: ``models--org--name/refs/main`` holds a commit hash, the file lies in
``models--org--name/snapshots/<hash>/``), with ``local_files_only=True`` and the Hub's offline switch on, so that
nothing reaches the network. The upload of ``save_pretrained(push_to_hub=True)`` is replaced by a record of the
folder's files.
"""

from __future__ import annotations

import json
import logging
import os

import pytest
from diffusers import StableDiffusionXLPipeline

from detailpp.config import DETAIL_DEFAULTS_FILE, ConfigError
from detailpp.hub import read_detail_defaults
from detailpp.models.loading import model_detail_defaults
from detailpp.models.tiny import build_tiny_pipeline
from detailpp.pipelines.sdxl import DetailInputError, DetailPlusPlusPipeline

COMMIT = "0123456789abcdef0123456789abcdef01234567"
FIELDS = {"mask_threshold": 0.3, "nursing": False}


@pytest.fixture
def offline(monkeypatch):
    """The Hub's own offline switch (HF_HUB_OFFLINE, read once at import), on for this test."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def fake_hub_cache(cache, repo_id: str, content) -> None:
    """``repo_id`` at ``COMMIT`` in the Hugging Face cache ``cache``, its branch main at that commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT, encoding="utf-8")
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    text = content if isinstance(content, str) else json.dumps(content)
    (snapshot / DETAIL_DEFAULTS_FILE).write_text(text, encoding="utf-8")


def hub_error(cls, message="not here"):
    """An instance of one of huggingface_hub's errors (some want an HTTP response in their constructor)."""
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    return error


def test_a_hub_ids_detail_defaults_come_from_the_hf_cache(tmp_path, offline, caplog):
    fake_hub_cache(tmp_path, "org/name", FIELDS)
    fake_hub_cache(tmp_path, "org/bad", {"tau": 0.3})
    hub = {"cache_dir": tmp_path, "local_files_only": True}
    assert read_detail_defaults("org/name", **hub) == FIELDS
    assert read_detail_defaults("org/name", revision=COMMIT, **hub) == FIELDS
    assert model_detail_defaults("org/name", cache_dir=str(tmp_path), local_files_only=True) == FIELDS
    # a repo, revision or file the cache does not hold is no recommendation, and no error
    with caplog.at_level(logging.DEBUG, logger="detailpp.hub"):
        assert read_detail_defaults("org/absent", **hub) == {}
        assert read_detail_defaults("org/name", revision="no-such-branch", **hub) == {}
    assert "no detail_config.json for 'org/absent'" in caplog.text
    assert not [r for r in caplog.records if r.levelno > logging.DEBUG]
    # a file that is there but holds a field DetailConfig does not know fails, naming the file and the repo
    with pytest.raises(ConfigError, match=r"models--org--bad.*detail_config\.json.*org/bad.*tau"):
        read_detail_defaults("org/bad", **hub)


def test_hub_misses_give_no_defaults_and_the_fetch_gets_the_given_arguments(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import errors

    calls, raised = [], []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs))
        raise raised[-1]

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    misses = [
        hub_error(errors.EntryNotFoundError),
        hub_error(errors.LocalEntryNotFoundError),
        hub_error(errors.RepositoryNotFoundError),
        hub_error(errors.RevisionNotFoundError),
        ConnectionError("offline"),
        OSError("disk"),
    ]
    try:
        import httpx

        misses.append(httpx.ConnectError("no network"))
    except ImportError:  # huggingface_hub < 1 reports network errors as requests' (OSErrors, above)
        pass
    for error in misses:
        raised.append(error)
        assert read_detail_defaults("org/name", revision="v1", token="hf_x") == {}, type(error).__name__
    assert len(calls) == len(misses)
    kwargs = {"revision": "v1", "cache_dir": None, "token": "hf_x", "local_files_only": False}
    assert calls[0] == ("org/name", DETAIL_DEFAULTS_FILE, kwargs)
    # an unexpected failure is not swallowed
    raised.append(RuntimeError("a bug"))
    with pytest.raises(RuntimeError, match="a bug"):
        read_detail_defaults("org/name")
    # not Hub ids: the built-in models, a single-file checkpoint, a path object
    calls.clear()
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"")
    for model in ("tiny-random", "sdxl-random", str(checkpoint)):
        assert model_detail_defaults(model) == {}
    assert read_detail_defaults(tmp_path / "missing") == {}
    assert calls == []


def test_from_pretrained_fetches_a_hub_ids_detail_defaults_with_its_arguments(tmp_path, offline, monkeypatch):
    import huggingface_hub

    loads, fetches = [], []
    real_download = huggingface_hub.hf_hub_download

    def fake_sdxl_from_pretrained(cls, name, **kwargs):  # no model download: a tiny pipeline of the asked class
        loads.append((name, kwargs))
        return build_tiny_pipeline(pipeline_class=cls)

    def recording_download(repo_id, filename, **kwargs):
        fetches.append((repo_id, kwargs))
        return real_download(repo_id, filename, **kwargs)

    monkeypatch.setattr(StableDiffusionXLPipeline, "from_pretrained", classmethod(fake_sdxl_from_pretrained))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", recording_download)
    fake_hub_cache(tmp_path, "org/name", FIELDS)
    hub = {"revision": COMMIT, "cache_dir": tmp_path, "token": "hf_x", "local_files_only": True}
    pipe = DetailPlusPlusPipeline.from_pretrained("org/name", variant="fp16", use_safetensors=True, **hub)
    assert isinstance(pipe, DetailPlusPlusPipeline) and dict(pipe.detail_defaults) == FIELDS
    assert pipe.make_detail_config().mask_threshold == 0.3
    assert loads == [("org/name", {"variant": "fp16", "use_safetensors": True, **hub})]
    assert fetches == [("org/name", hub)]  # only the arguments that locate the file
    # without the arguments: the default cache holds no such repo, so no recommendation and no error
    assert dict(DetailPlusPlusPipeline.from_pretrained("org/name").detail_defaults) == {}
    assert fetches[-1] == ("org/name", {"revision": None, "cache_dir": None, "token": None, "local_files_only": False})
    fake_hub_cache(tmp_path, "org/bad", '{"mask_threshold": 2}')
    with pytest.raises(DetailInputError, match=r"detail_config\.json.*org/bad.*mask_threshold"):
        DetailPlusPlusPipeline.from_pretrained("org/bad", cache_dir=tmp_path, local_files_only=True)


def test_save_pretrained_with_push_to_hub_uploads_the_detail_defaults(tmp_path, monkeypatch):
    from diffusers.pipelines import pipeline_utils
    from huggingface_hub import ModelCard

    uploads = []

    def record_upload(self, working_dir, repo_id, **kwargs):
        uploads.append((repo_id, sorted(os.listdir(working_dir))))

    # the names diffusers' save_pretrained uses for pushing (0.35.2 and 0.42.1 alike); no network
    monkeypatch.setattr(
        pipeline_utils, "create_repo", lambda repo_id, **kwargs: type("Repo", (), {"repo_id": repo_id})
    )
    monkeypatch.setattr(pipeline_utils, "load_or_create_model_card", lambda *a, **k: ModelCard("---\n---\n"))
    monkeypatch.setattr(DetailPlusPlusPipeline, "_upload_folder", record_upload)
    pipe = build_tiny_pipeline()
    pipe.set_detail_defaults(FIELDS)
    folder = tmp_path / "new" / "model"  # created by save_pretrained
    pipe.save_pretrained(str(folder), push_to_hub=True, repo_id="me/model")
    ((repo_id, files),) = uploads
    assert repo_id == "me/model" and DETAIL_DEFAULTS_FILE in files and "model_index.json" in files
    assert json.loads((folder / DETAIL_DEFAULTS_FILE).read_text(encoding="utf-8")) == FIELDS
    # a pipeline without recommendations removes the stale file before the upload
    pipe.detail_defaults = DetailPlusPlusPipeline.detail_defaults
    pipe.save_pretrained(str(folder), push_to_hub=True, repo_id="me/model")
    assert DETAIL_DEFAULTS_FILE not in uploads[-1][1] and "model_index.json" in uploads[-1][1]
    assert not (folder / DETAIL_DEFAULTS_FILE).exists()
