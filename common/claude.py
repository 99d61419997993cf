"""The project's Claude client: one place that talks to the Anthropic Messages API.

Used by feature interpretation (explain a feature from its top-activating contexts, then score the
explanation by detection) and by stimulus generation. It wraps the official `anthropic` SDK
(`anthropic.Anthropic(...).messages.create`) and adds what a research pipeline needs:

* **Key.** Read from the environment variable `ANTHROPIC_API_KEY` only (an explicit `api_key=` exists
  for tests). Without it, `ClaudeClient(...)` -- and `require_api_key()`, which a script should call
  first thing, before any model work -- raises `common.cli.UserError` with one line. The key never
  appears in logs, exceptions, cache files, outputs or `repr(client)`: errors are rebuilt here from the
  status code and the API's error type (any copy of the key is scrubbed), never passed on from the SDK.
* **Model.** `DEFAULT_MODEL` (a flag, `--claude-model`, in the scripts that use it).
* **Retries.** Our own, with exponential backoff: attempt i (0-based) waits
  `backoff * 2**i * (1 + U[0, 0.1))` seconds (jitter from a seeded `random.Random`; at most
  `MAX_DELAY`; a longer `retry-after` header from the API wins, up to `MAX_DELAY`) on HTTP 429, 500,
  502, 503, 504, 529 ("overloaded") and on connection errors / timeouts, at most `max_retries` times.
  Other statuses (400, 401, 403, 404, ...) are not retried and raise a one-line `ClaudeAPIError` (a
  `UserError`). The SDK's own retries are disabled (`max_retries=0`), so these are the only ones.
  `sleep` is injectable so that tests don't wait.
* **Cache.** With `cache_dir`, every response is stored as `cache_dir/<sha256>.json`, keyed by the
  SHA-256 of (model, system, prompt, max_tokens, temperature), holding `{"model", "prompt_sha256",
  "response"}` (never the key), written atomically (temp file + `os.replace`). A hit makes no request,
  so a rerun of an interpretation step is free and reproducible. `cache_dir=None` disables it.
* **Concurrency.** `complete_many` runs at most `max_concurrency` requests at once, in order.
* **Counters.** `n_requests` (HTTP requests sent, retries included), `n_retries`, `n_cache_hits`,
  `n_input_tokens`, `n_output_tokens`, for the run's report.

Temperature: the installed SDK (anthropic 2.x, API version 2026-10-21) has no `temperature` argument
in `messages.create`, and current models reject it. So `temperature=None` (the default) sends none;
a number is sent (as a keyword on SDKs that have one, else in the request body) for older API versions
and models that accept it -- if the API refuses it, the 400 surfaces as a one-line error naming why.

Example::

    from common.claude import ClaudeClient, DEFAULT_MODEL, require_api_key
    require_api_key()                                   # fail before loading any model
    client = ClaudeClient(DEFAULT_MODEL, cache_dir="checkpoints/claude_cache")
    texts = client.complete_many(prompts, system="You explain SAE features.", max_tokens=300)
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import random
import tempfile
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable

import anthropic

from .errors import UserError

DEFAULT_MODEL = "claude-sonnet-4-6"
API_KEY_ENV = "ANTHROPIC_API_KEY"
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504, 529})
MAX_DELAY = 60.0            # seconds: cap on one backoff wait
_JITTER = 0.1               # delays are multiplied by 1 + U[0, _JITTER)
_MAX_API_MESSAGE = 200      # characters of the API's own error message kept in ours


def _sdk_http_module():
    """The HTTP library the installed SDK is built on: `httpx2` for anthropic >= 2, `httpx` before.

    `http_client=` must be a `Client` of exactly that library (the SDK checks it with isinstance).
    """
    for cls in getattr(anthropic, "DefaultHttpxClient", object).__mro__:
        top = (getattr(cls, "__module__", "") or "").partition(".")[0]
        if top in ("httpx", "httpx2"):
            return importlib.import_module(top)
    return importlib.import_module("httpx")


HTTPX = _sdk_http_module()   # tests: HTTPX.Client(transport=HTTPX.MockTransport(handler))


class ClaudeAPIError(UserError):
    """A Claude API call failed for good. One line; never carries the key or request headers."""

    def __init__(self, message: str, status_code: int | None = None, error_type: str | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.error_type = error_type


def require_api_key(api_key: str | None = None) -> str:
    """The API key (`api_key`, else `$ANTHROPIC_API_KEY`); a one-line UserError when there is none.

    Scripts call this first thing, so a missing key fails before any model work.
    """
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
    key = (key or "").strip()
    if not key:
        raise UserError(f"{API_KEY_ENV} is not set; export it (the key is read from the environment only) "
                        "or run without the Claude step")
    return key


def _one_line(text: str, secret: str, limit: int = _MAX_API_MESSAGE) -> str:
    text = " ".join(str(text).split())
    if secret:
        text = text.replace(secret, "***")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _retry_after(exc: BaseException) -> float | None:
    """Seconds from a `retry-after` header of an API error response, if any."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    try:
        value = float(headers.get("retry-after", ""))
    except (TypeError, ValueError):
        return None
    return value if value >= 0 else None


class ClaudeClient:
    """A Claude Messages API client with retries, an on-disk response cache and bounded concurrency.

    model: Claude model id (`DEFAULT_MODEL`). cache_dir: folder for cached responses, or None for no
    cache. max_retries: retries after the first attempt on 429/5xx/529/connection errors. backoff: the
    first retry's delay in seconds (doubling after). max_concurrency: requests at once in
    `complete_many`. timeout: seconds per HTTP request. http_client: an HTTP client of the SDK's library
    (see `HTTPX`), e.g. with a mock transport in tests. api_key: for tests; otherwise
    `$ANTHROPIC_API_KEY`. sleep: the wait function (tests pass a recorder). seed: for the jitter.
    """

    def __init__(self, model: str, cache_dir: str | Path | None, max_retries: int = 4,
                 backoff: float = 1.0, max_concurrency: int = 4, timeout: float = 60.0,
                 http_client: Any | None = None, api_key: str | None = None,
                 sleep: Callable[[float], Any] = time.sleep, seed: int = 0):
        key = require_api_key(api_key)          # before anything else
        if not model or not isinstance(model, str):
            raise UserError("the Claude model id must be a non-empty string (e.g. --claude-model "
                            f"{DEFAULT_MODEL})")
        if max_retries < 0:
            raise UserError(f"max_retries must be >= 0, got {max_retries}")
        if backoff < 0:
            raise UserError(f"backoff must be >= 0, got {backoff}")
        if max_concurrency < 1:
            raise UserError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if timeout <= 0:
            raise UserError(f"timeout must be positive, got {timeout}")
        self.model = model
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.max_concurrency = int(max_concurrency)
        self.timeout = float(timeout)
        self._sleep = sleep
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.n_requests = 0
        self.n_cache_hits = 0
        self.n_retries = 0
        self.n_input_tokens = 0
        self.n_output_tokens = 0
        kwargs: dict[str, Any] = dict(api_key=key, max_retries=0, timeout=self.timeout)
        if http_client is not None:
            if not isinstance(http_client, HTTPX.Client):
                raise UserError(f"http_client must be a {HTTPX.__name__}.Client (the installed anthropic SDK is "
                                f"built on {HTTPX.__name__}), got {type(http_client).__name__}")
            kwargs["http_client"] = http_client
        try:
            self._client = anthropic.Anthropic(**kwargs)
        except TypeError as e:      # e.g. an http_client of the wrong library; the message holds no key
            raise UserError(f"could not create the Anthropic client: {_one_line(e, key)}") from None
        # The key lives only inside the SDK client; kept here solely to scrub it from error text.
        self.__secret = key
        self._temperature_kw = "temperature" in inspect.signature(self._client.messages.create).parameters

    def __repr__(self) -> str:
        return (f"ClaudeClient(model={self.model!r}, cache_dir={str(self.cache_dir) if self.cache_dir else None!r}, "
                f"max_retries={self.max_retries}, max_concurrency={self.max_concurrency})")

    __str__ = __repr__

    def __getstate__(self):
        raise TypeError("ClaudeClient is not picklable (it holds the API key)")

    # ------------------------------------------------------------------ cache
    def cache_key(self, prompt: str, system: str | None = None, max_tokens: int = 1024,
                  temperature: float | None = None) -> str:
        """SHA-256 (hex) of (model, system, prompt, max_tokens, temperature): the cache file's name."""
        blob = json.dumps({"model": self.model, "system": system, "prompt": prompt, "max_tokens": int(max_tokens),
                           "temperature": None if temperature is None else float(temperature)},
                          sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def _cache_path(self, key: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / f"{key}.json"

    @staticmethod
    def _cache_read(path: Path) -> str | None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None                      # missing or half-written/corrupt: a miss, rewritten below
        response = data.get("response") if isinstance(data, dict) else None
        return response if isinstance(response, str) else None

    def _cache_write(self, path: Path, prompt: str, response: str) -> None:
        record = {"model": self.model, "prompt_sha256": hashlib.sha256(prompt.encode("utf-8")).hexdigest(),
                  "response": response}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(record, f, ensure_ascii=False)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    # ------------------------------------------------------------------ calls
    def complete(self, prompt: str, system: str | None = None, max_tokens: int = 1024,
                 temperature: float | None = None) -> str:
        """One Messages API call (or a cache hit): the reply's text (all text blocks joined)."""
        if not isinstance(prompt, str):
            raise UserError(f"prompt must be a string, got {type(prompt).__name__}")
        if max_tokens < 1:
            raise UserError(f"max_tokens must be >= 1, got {max_tokens}")
        path = self._cache_path(self.cache_key(prompt, system, max_tokens, temperature))
        if path is not None:
            cached = self._cache_read(path)
            if cached is not None:
                with self._lock:
                    self.n_cache_hits += 1
                return cached
        text = self._call_with_retries(prompt, system, max_tokens, temperature)
        if path is not None:
            self._cache_write(path, prompt, text)
        return text

    def complete_many(self, prompts: list[str], system: str | None = None, **kw) -> list[str]:
        """`complete` for every prompt, at most `max_concurrency` at once; results in the prompts' order.

        The first failure cancels the requests not yet started and is raised (finished ones are cached).
        """
        prompts = list(prompts)
        if not prompts:
            return []
        workers = min(self.max_concurrency, len(prompts))
        if workers == 1:
            return [self.complete(p, system=system, **kw) for p in prompts]
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="claude") as pool:
            futures = [pool.submit(self.complete, p, system=system, **kw) for p in prompts]
            done, pending = wait(futures, return_when=FIRST_EXCEPTION)
            for f in pending:
                f.cancel()
            for f in futures:
                if f.done() and not f.cancelled() and f.exception() is not None:
                    raise f.exception()
            return [f.result() for f in futures]

    def _delay(self, attempt: int, exc: BaseException) -> float:
        with self._lock:
            jitter = self._rng.random() * _JITTER
        delay = min(self.backoff * (2 ** attempt) * (1.0 + jitter), MAX_DELAY)
        after = _retry_after(exc)
        if after is not None:
            delay = max(delay, min(after, MAX_DELAY))
        return delay

    def _call_with_retries(self, prompt: str, system: str | None, max_tokens: int,
                           temperature: float | None) -> str:
        kwargs: dict[str, Any] = dict(model=self.model, max_tokens=int(max_tokens),
                                      messages=[{"role": "user", "content": prompt}])
        if system is not None:
            kwargs["system"] = system
        if temperature is not None:
            if self._temperature_kw:
                kwargs["temperature"] = float(temperature)
            else:
                kwargs["extra_body"] = {"temperature": float(temperature)}
        attempt = 0
        while True:
            with self._lock:
                self.n_requests += 1
            try:
                response = self._client.messages.create(**kwargs)
            except anthropic.APIStatusError as e:
                status = int(getattr(e, "status_code", 0) or 0)
                if status in RETRY_STATUSES and attempt < self.max_retries:
                    self._backoff(attempt, e)
                    attempt += 1
                    continue
                raise self._status_error(e, status, attempt) from None
            except anthropic.APIConnectionError as e:
                if attempt < self.max_retries:
                    self._backoff(attempt, e)
                    attempt += 1
                    continue
                kind = "timed out" if isinstance(e, anthropic.APITimeoutError) else "could not connect"
                raise ClaudeAPIError(f"Claude API request {kind} after {attempt + 1} attempt(s) "
                                     f"(timeout {self.timeout:g} s); check the network, or retry later") from None
            except anthropic.APIError as e:  # e.g. an unparseable response: no retry, no SDK text
                raise ClaudeAPIError(f"Claude API call failed ({type(e).__name__})") from None
            usage = getattr(response, "usage", None)
            with self._lock:
                self.n_input_tokens += int(getattr(usage, "input_tokens", 0) or 0)
                self.n_output_tokens += int(getattr(usage, "output_tokens", 0) or 0)
            return "".join(getattr(b, "text", "") for b in (response.content or [])
                           if getattr(b, "type", None) == "text")

    def _backoff(self, attempt: int, exc: BaseException) -> None:
        with self._lock:
            self.n_retries += 1
        self._sleep(self._delay(attempt, exc))

    def _status_error(self, e: BaseException, status: int, attempt: int) -> ClaudeAPIError:
        """A one-line error from the status code and the API's error type/message (key scrubbed)."""
        etype = getattr(e, "type", None)
        etype = etype if isinstance(etype, str) else None
        api_msg = getattr(e, "api_message", None)
        if not isinstance(api_msg, str):      # older SDKs: read error.message from the body
            body = getattr(e, "body", None)
            err = body.get("error") if isinstance(body, dict) else None
            api_msg = err.get("message") if isinstance(err, dict) else None
            if etype is None and isinstance(err, dict) and isinstance(err.get("type"), str):
                etype = err["type"]
        what = f"{status} {etype}" if etype else f"{status}"
        detail = f": {_one_line(api_msg, self.__secret)}" if isinstance(api_msg, str) and api_msg.strip() else ""
        if status == 401:
            msg = (f"the API rejected {API_KEY_ENV} ({what}); check that the exported key is valid and active")
        elif status == 403:
            msg = f"the API refused the request ({what}){detail}; check the key's permissions for model {self.model!r}"
        elif status == 404:
            msg = f"the API did not find model {self.model!r} ({what}){detail}; pass a valid Claude model id"
        elif status in RETRY_STATUSES:
            msg = f"Claude API still failing after {attempt + 1} attempt(s) ({what}){detail}; retry later"
        else:
            msg = f"the API rejected the request ({what}){detail}"
        return ClaudeAPIError(_one_line(msg, self.__secret, limit=400), status_code=status, error_type=etype)
