"""The LLM planner: prompt decomposition by a language model behind any OpenAI-compatible chat-completions server
(OpenAI, Ollama, vLLM, llama.cpp's server, LM Studio), the paper's other planner ("such as spaCy or ChatGPT").

The question (:mod:`detailpp.parsing.llm_prompt`) is asked with structured output (a JSON schema), else JSON mode
where the server rejects schemas, else plainly; at temperature 0 with a seed. The answer is checked by the project's
rules (:mod:`detailpp.parsing.llm_answer`: the token indices are always the project's). A plan that breaks a rule
gets one repair round (the error sent back to the model); a second failure, or a refusal, falls back to the spaCy
parser's plan, with a :attr:`~detailpp.plan.DecompositionPlan.notice` saying why. The server's failures are one line
each (:class:`LLMError`): connection refused, timeout, 401/403, 404, and 429/5xx after bounded retries.
Plans are cached (:mod:`detailpp.parsing.plan_cache`), keyed by prompt, granularity, planner, model and prompt version.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from detailpp.errors import DetailError
from detailpp.parsing.llm_answer import AnswerError, extract_json, plan_from_answer
from detailpp.parsing.llm_prompt import PLAN_SCHEMA, PROMPT_VERSION, SYSTEM_PROMPT, repair_message, user_message
from detailpp.parsing.plan_cache import PlanCache, cache_key
from detailpp.plan import DecompositionPlan, validate_plan

logger = logging.getLogger(__name__)

#: where the ``openai`` package sends requests when neither ``base_url`` nor ``OPENAI_BASE_URL`` is set.
DEFAULT_BASE_URL = "https://api.openai.com/v1"

#: the key sent to a server that needs none (Ollama, llama.cpp, vLLM...): the ``openai`` client insists on one.
NO_KEY = "no-key"

#: the answer formats tried in turn: a JSON schema, JSON mode, none (the server rejected the ones before).
FORMATS = ("json_schema", "json_object", "text")


class LLMError(DetailError, RuntimeError):
    """The language model server could not be used (unreachable, refused the key, no such model...); one line."""


class Refusal(Exception):
    """The model declined to answer (a refusal or a content filter)."""


def import_openai() -> Any:
    """The ``openai`` package, or :class:`LLMError` naming the extra that installs it."""
    try:
        import openai
    except ImportError as e:
        raise LLMError(
            f"The LLM planner needs the openai package ({e}); install it with: pip install 'detailpp[llm]'."
        ) from None
    return openai


def _short(text: Any, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class LLMPlanner:
    """Decomposes prompts with a language model behind an OpenAI-compatible server; see the module doc.

    Args:
        model: the server's model name (``"gpt-4o-mini"``, Ollama's ``"llama3.1"``...).
        base_url: the server's API root, e.g. ``http://127.0.0.1:11434/v1`` (default: ``OPENAI_BASE_URL``, else
            OpenAI's).
        api_key: default ``OPENAI_API_KEY``; a server other than OpenAI's needs none.
        timeout: seconds one request may take.
        retries: how many times a 429 or 5xx answer is retried (then :class:`LLMError`).
        backoff: the first retry's wait in seconds, doubled each time (at most ``max_backoff``; a ``Retry-After``
            header within that bound is honoured).
        seed: sent with each request where the server takes one (``None``: not sent).
        cache: a :class:`PlanCache`, the path of its JSON Lines file, or ``None`` (in memory only).
        sleep: waits between retries (injectable for tests).
    """

    name = "llm"

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        seed: int | None = 0,
        cache: PlanCache | str | Path | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not isinstance(model, str) or not model.strip():
            raise LLMError(
                "The LLM planner needs a model: give --llm-model NAME (e.g. gpt-4o-mini on OpenAI, llama3.1 on "
                "Ollama)."
            )
        if not timeout > 0:
            raise LLMError(f"The LLM planner's timeout must be a positive number of seconds, got {timeout!r}.")
        self.model = model.strip()
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        if urlparse(self.base_url).scheme not in ("http", "https") or not urlparse(self.base_url).netloc:
            raise LLMError(
                f"--llm-base-url must be an http(s) URL such as http://127.0.0.1:11434/v1, got {base_url!r}."
            )
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY") or None
        if self.api_key is None and urlparse(self.base_url).hostname == urlparse(DEFAULT_BASE_URL).hostname:
            raise LLMError(
                f"The LLM planner at {self.base_url} needs an API key: set OPENAI_API_KEY (a local server needs none)."
            )
        self.timeout, self.retries, self.seed = float(timeout), int(retries), seed
        self.backoff, self.max_backoff, self.sleep = backoff, max_backoff, sleep
        self.cache = cache if isinstance(cache, PlanCache) else PlanCache(cache)
        self._format = 0  # index in FORMATS: lowered once when the server rejects a format
        # sampling settings, each dropped once when the model rejects it (reasoning models take no temperature)
        self._sampling: dict[str, Any] = {"temperature": 0} | ({} if seed is None else {"seed": seed})
        self._client_obj: Any = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"LLMPlanner(model={self.model!r}, base_url={self.base_url!r})"

    def identity(self) -> dict[str, str]:
        """What a plan depends on: recorded in the cache key and in a bench run's identity."""
        return {"planner": self.name, "model": self.model, "prompt_version": PROMPT_VERSION}

    # ------------------------------------------------------------------ the server

    def _client(self) -> Any:
        with self._lock:
            if self._client_obj is None:
                openai = import_openai()
                self._client_obj = openai.OpenAI(
                    base_url=self.base_url, api_key=self.api_key or NO_KEY, timeout=self.timeout, max_retries=0
                )
            return self._client_obj

    def _failure(self, e: Exception, attempts: int = 1) -> LLMError:
        """One line for a failed request."""
        openai, url = import_openai(), self.base_url
        if isinstance(e, openai.APITimeoutError):
            return LLMError(
                f"The language model server at {url} did not answer within {self.timeout:g} s; raise --llm-timeout, "
                "or use a smaller model."
            )
        if isinstance(e, openai.APIConnectionError):
            cause = e.__cause__ or e.__context__
            why = (
                "connection refused" if isinstance(cause, ConnectionRefusedError) or "refused" in str(cause) else None
            )
            why = why or _short(cause or e, 100)
            return LLMError(
                f"Cannot reach the language model server at {url} ({why}); start the server (e.g. `ollama serve`) or "
                "fix --llm-base-url."
            )
        status = getattr(e, "status_code", None)
        body = getattr(e, "body", None)
        message = body.get("message") if isinstance(body, dict) and isinstance(body.get("message"), str) else None
        message = _short(message or getattr(e, "message", e))
        if status == 401:
            return LLMError(
                f"The language model server at {url} refused the API key (401 Unauthorized); set OPENAI_API_KEY to a "
                "valid key."
            )
        if status == 403:
            return LLMError(
                f"The language model server at {url} forbids this request (403 Forbidden: {message}); the key may not "
                f"use the model {self.model!r}."
            )
        if status == 404:
            return LLMError(
                f"The language model server at {url} has no model {self.model!r} or no chat completions (404); check "
                f"--llm-model{self._models_hint()} and that --llm-base-url ends in /v1."
            )
        if status == 429 or (isinstance(status, int) and status >= 500):
            what = "is rate-limiting (429)" if status == 429 else f"failed ({status}: {message})"
            return LLMError(
                f"The language model server at {url} {what} {attempts} time(s) in a row; wait and run again (the "
                "plans made so far are cached)."
            )
        if isinstance(status, int):
            return LLMError(f"The language model server at {url} rejected the request ({status}: {message}).")
        return LLMError(f"The language model server at {url} answered something unreadable ({_short(e)}).")

    def _models_hint(self) -> str:
        try:
            names = sorted(m.id for m in self._client().models.list())
        except Exception:  # a hint only: the server may have no model list
            return ""
        return f" (the server has: {', '.join(names[:8])}{', ...' if len(names) > 8 else ''})" if names else ""

    def check(self, prompts: Sequence[str] = (), granularity: str = "subject") -> None:
        """Check the server is reachable and takes the key (listing its models), before any model loads.

        Skipped when every one of ``prompts`` is already in the cache. Raises :class:`LLMError`.
        """
        if prompts and all(self._cached(p, granularity) is not None for p in prompts):
            return
        openai = import_openai()
        try:
            self._client().models.list()
        except openai.NotFoundError:
            return  # a server without a model list: the first request tells the rest
        except openai.APIError as e:
            raise self._failure(e) from None

    def _create(self, messages: list[dict]) -> Any:
        kind = FORMATS[self._format]
        extra: dict[str, Any] = {}
        if kind == "json_schema":
            schema = {"name": "detail_plan", "schema": PLAN_SCHEMA, "strict": True}
            extra["response_format"] = {"type": "json_schema", "json_schema": schema}
        elif kind == "json_object":
            extra["response_format"] = {"type": "json_object"}
        extra |= self._sampling
        return self._client().chat.completions.create(model=self.model, messages=messages, **extra)

    def _relax(self, e: Exception) -> bool:
        """After a 400: drop the sampling setting the server names, else lower the answer format; ``False`` when
        nothing is left to drop."""
        text = f"{getattr(e, 'param', '') or ''} {getattr(e, 'message', e)}".lower()
        named = [k for k in self._sampling if k in text]
        if named:
            logger.info("%s rejected %s (%s); asking again without it", self.base_url, named[0], _short(e))
            del self._sampling[named[0]]
            return True
        if self._format + 1 < len(FORMATS):
            logger.info(
                "%s rejected %s (%s); asking again without it", self.base_url, FORMATS[self._format], _short(e)
            )
            self._format += 1
            return True
        return False

    def _delay(self, e: Exception, attempt: int) -> float:
        delay = min(self.backoff * 2**attempt, self.max_backoff)
        headers = getattr(getattr(e, "response", None), "headers", None) or {}
        try:
            after = float(headers.get("retry-after", ""))
        except ValueError:
            return delay
        return min(max(after, 0.0), self.max_backoff)

    def complete(self, messages: list[dict]) -> str:
        """The model's answer text to ``messages``; 429 and 5xx retried with backoff, a rejected sampling setting
        dropped, a rejected answer format lowered to the next of :data:`FORMATS`.

        Raises:
            LLMError: the request failed (one line).
            Refusal: the model declined.
        """
        openai = import_openai()
        attempt = 0
        while True:
            try:
                response = self._create(messages)
                break
            except openai.BadRequestError as e:
                if self._relax(e):
                    continue
                raise self._failure(e) from None
            except (openai.RateLimitError, openai.InternalServerError) as e:
                if attempt >= self.retries:
                    raise self._failure(e, attempt + 1) from None
                delay = self._delay(e, attempt)
                logger.warning("%s answered %s; retrying in %.1f s", self.base_url, e.status_code, delay)
                self.sleep(delay)
                attempt += 1
            except openai.APIError as e:
                raise self._failure(e) from None
        return self._answer_text(response)

    def _answer_text(self, response: Any) -> str:
        choices = getattr(response, "choices", None)
        if not choices:
            raise LLMError(f"The language model server at {self.base_url} answered without a choice.")
        choice = choices[0]
        message = choice.message
        refusal = getattr(message, "refusal", None)
        if refusal:
            raise Refusal(_short(refusal, 120))
        if choice.finish_reason == "content_filter":
            raise Refusal("its content filter stopped the answer")
        return message.content or ""

    # ------------------------------------------------------------------ the plan

    def _cached(self, prompt: str, granularity: str) -> dict | None:
        record = self.cache.get(cache_key(prompt, granularity, self.identity()))
        return None if record is None else record.get("plan")

    def propose(self, prompt: str, granularity: str, tokenizer: Any) -> DecompositionPlan:
        """The validated plan for ``prompt``: cached, else the model's (one repair round), else spaCy's with a notice.

        Raises:
            LLMError: the server failed (nothing is cached then).
            PlanError: the prompt itself is unusable (empty, prompt-weight syntax), as with the spaCy planner.
        """
        from detailpp.parsing.decompose import check_prompt_for_planning

        check_prompt_for_planning(prompt, granularity)
        cached = self._cached(prompt, granularity)
        if cached is not None:
            logger.debug("plan for %r read from the cache", prompt)
            plan = validate_plan(DecompositionPlan.from_dict(cached), tokenizer, prompt)
            if plan.notice:  # a cached fall-back says so again
                logger.warning("%s (%r, cached)", plan.notice, prompt)
            return plan
        plan = self._ask(prompt, granularity, tokenizer)
        record = {"prompt": prompt, "granularity": granularity, **self.identity(), "plan": plan.to_dict()}
        self.cache.put(cache_key(prompt, granularity, self.identity()), record)
        return plan

    def _ask(self, prompt: str, granularity: str, tokenizer: Any) -> DecompositionPlan:
        messages = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": user_message(prompt, granularity)},
        ]
        for round_ in range(2):
            try:
                text = self.complete(messages)
            except Refusal as e:
                return self._fallback(prompt, granularity, tokenizer, f"the model refused: {e}")
            try:
                return plan_from_answer(prompt, extract_json(text), granularity, tokenizer)
            except AnswerError as e:
                error = str(e)
            logger.info("the model's plan for %r breaks a rule (%s)%s", prompt, error, "" if round_ else "; repairing")
            messages += [
                {"role": "assistant", "content": text},
                {"role": "user", "content": repair_message(error)},
            ]
        return self._fallback(prompt, granularity, tokenizer, f"its plan broke a rule after one repair round: {error}")

    def _fallback(self, prompt: str, granularity: str, tokenizer: Any, reason: str) -> DecompositionPlan:
        from dataclasses import replace

        from detailpp.parsing.decompose import decompose

        plan = decompose(prompt, granularity, tokenizer=tokenizer)
        notice = f"The language model's plan was not used ({reason}); the spaCy parser's plan is used instead."
        if plan.notice:
            notice = f"{notice} {plan.notice}"
        logger.warning("%s (%r)", notice, prompt)
        return replace(plan, notice=notice)
