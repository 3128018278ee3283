"""A real OpenAI-compatible HTTP server on 127.0.0.1 for the LLM planner's tests: ``POST /v1/chat/completions``
replays scripted answers in order, ``GET /v1/models`` lists one model; every request is recorded. Nothing leaves the
machine."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MODEL = "test-model"


def completion(content: str | None = None, refusal: str | None = None, finish_reason: str = "stop") -> dict:
    """A chat completion whose one choice says ``content`` (or refuses)."""
    message = {"role": "assistant", "content": content, "refusal": refusal}
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 0,
        "model": MODEL,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


def answer(plan: dict | str) -> tuple[int, dict]:
    """A 200 answer whose content is ``plan`` (JSON-encoded unless it is text already)."""
    return 200, completion(plan if isinstance(plan, str) else json.dumps(plan))


def error(status: int, message: str = "error", headers: dict | None = None) -> tuple[int, dict, dict]:
    return status, {"error": {"message": message, "type": "test", "code": None}}, headers or {}


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class FakeLLMServer:
    """Scripted answers (``(status, body[, headers[, delay]])``) for chat completions, consumed in order."""

    script: list[tuple] = field(default_factory=list)
    models_status: int = 200
    requests: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _send(self, status: int, body: Any, headers: dict | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _record(self, body: Any) -> None:
                server.requests.append(Request(self.command, self.path, dict(self.headers), body))

            def do_GET(self) -> None:
                self._record(None)
                if self.path.rstrip("/") != "/v1/models":
                    return self._send(404, {"error": {"message": "not found"}})
                if server.models_status != 200:
                    return self._send(*error(server.models_status)[:2])
                self._send(
                    200,
                    {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "test"}]},
                )

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"null")
                self._record(body)
                if self.path != "/v1/chat/completions" or not server.script:
                    return self._send(404, {"error": {"message": f"nothing scripted for {self.path}"}})
                status, payload, *rest = server.script.pop(0)
                headers = rest[0] if rest else {}
                if len(rest) > 1:
                    time.sleep(rest[1])
                try:
                    self._send(status, payload, headers)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def chats(self) -> list[Request]:
        return [r for r in self.requests if r.path == "/v1/chat/completions"]

    def __enter__(self) -> FakeLLMServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
