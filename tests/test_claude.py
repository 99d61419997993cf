"""common.claude through the real anthropic SDK, against a fake Messages API (a mock HTTP transport).

No test touches the network: every client gets `http_client=HTTPX.Client(transport=HTTPX.MockTransport(...))`,
where HTTPX is the HTTP library the installed SDK is built on (httpx2 for anthropic >= 2, httpx before).
"""
from __future__ import annotations

import json
import threading
import time

import pytest

from common import claude
from common.claude import HTTPX, ClaudeAPIError, ClaudeClient, require_api_key
from common.cli import UserError

KEY = "sk-test-SECRET123"
SECRET = "SECRET123"


def ok_json(text: str, model: str = "claude-test") -> dict:
    return {"id": "msg_1", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": 3, "output_tokens": 5}}


def error_json(etype: str, message: str) -> dict:
    return {"type": "error", "error": {"type": etype, "message": message}}


class FakeAPI:
    """A Messages API handler: fails with `failures` (a list of statuses / "connect") first, then answers.

    The reply is `reply(prompt)`; every request is recorded; `max_active` is the peak number of
    requests in flight at once (each takes `delay` seconds).
    """

    def __init__(self, failures=(), reply=lambda p: f"echo: {p}", delay: float = 0.0, retry_after=None):
        self.failures = list(failures)
        self.reply = reply
        self.delay = delay
        self.retry_after = retry_after
        self.requests: list = []
        self.lock = threading.Lock()
        self.active = 0
        self.max_active = 0

    def __call__(self, request):
        with self.lock:
            self.requests.append(request)
            failure = self.failures.pop(0) if self.failures else None
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            if self.delay:
                time.sleep(self.delay)
            if failure == "connect":
                raise HTTPX.ConnectError("connection refused", request=request)
            if failure is not None:
                etype = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                         404: "not_found_error", 429: "rate_limit_error", 529: "overloaded_error"}.get(failure,
                                                                                                 "api_error")
                headers = {"retry-after": str(self.retry_after)} if self.retry_after is not None else {}
                return HTTPX.Response(failure, json=error_json(etype, f"fake {etype}"), headers=headers)
            body = json.loads(request.content)
            return HTTPX.Response(200, json=ok_json(self.reply(body["messages"][0]["content"]), body["model"]))
        finally:
            with self.lock:
                self.active -= 1

    @property
    def n(self) -> int:
        return len(self.requests)


class SleepRecorder:
    def __init__(self):
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def make_client(api: FakeAPI, tmp_path=None, **kw) -> ClaudeClient:
    kw.setdefault("sleep", SleepRecorder())
    kw.setdefault("api_key", KEY)
    return ClaudeClient(kw.pop("model", "claude-test"), tmp_path, http_client=HTTPX.Client(transport=HTTPX.MockTransport(api)),
                        **kw)


def test_request_content_and_key_header():
    api = FakeAPI()
    client = make_client(api)
    out = client.complete("What does feature 7 detect?", system="You explain features.", max_tokens=77)
    assert out == "echo: What does feature 7 detect?"
    assert api.n == 1 and client.n_requests == 1 and client.n_retries == 0
    assert (client.n_input_tokens, client.n_output_tokens) == (3, 5)
    req = api.requests[0]
    assert req.method == "POST" and req.url.path.endswith("/v1/messages")
    body = json.loads(req.content)
    assert body["model"] == "claude-test"
    assert body["max_tokens"] == 77
    assert body["messages"] == [{"role": "user", "content": "What does feature 7 detect?"}]
    assert body["system"] == "You explain features."
    assert "temperature" not in body            # default: not sent (the SDK's API version has none)
    # anthropic < 2 sends the key as `x-api-key`; 2.x as `Authorization: Bearer <key>`.
    assert req.headers.get("x-api-key") == KEY or req.headers.get("authorization") == f"Bearer {KEY}"
    assert "anthropic-version" in req.headers


def test_explicit_temperature_is_sent_and_keys_the_cache(tmp_path):
    api = FakeAPI()
    client = make_client(api, tmp_path)
    client.complete("p", temperature=0.0)
    assert json.loads(api.requests[0].content)["temperature"] == 0.0
    client.complete("p", temperature=0.0)
    assert api.n == 1
    client.complete("p")                     # no temperature: another cache entry
    client.complete("p", temperature=0.5)
    assert api.n == 3 and "temperature" not in json.loads(api.requests[1].content)
    assert json.loads(api.requests[2].content)["temperature"] == 0.5


@pytest.mark.parametrize("status", [529, 500])
def test_retries_with_growing_backoff(status):
    api = FakeAPI(failures=[status] * 3)
    sleep = SleepRecorder()
    client = make_client(api, sleep=sleep, backoff=0.5, max_retries=4)
    assert client.complete("hello") == "echo: hello"
    assert api.n == 4 and client.n_requests == 4 and client.n_retries == 3
    assert len(sleep.calls) == 3
    assert all(b > a for a, b in zip(sleep.calls, sleep.calls[1:]))
    for i, d in enumerate(sleep.calls):          # backoff * 2**i with at most 10% jitter
        assert 0.5 * 2 ** i <= d <= 0.5 * 2 ** i * 1.1


@pytest.mark.parametrize("status", [429, 502, 503, 504])
def test_other_retryable_statuses(status):
    api = FakeAPI(failures=[status])
    client = make_client(api)
    assert client.complete("x") == "echo: x" and client.n_retries == 1 and api.n == 2


def test_connection_error_is_retried():
    api = FakeAPI(failures=["connect", "connect"])
    client = make_client(api)
    assert client.complete("x") == "echo: x"
    assert client.n_retries == 2 and api.n == 3


def test_retry_after_header_is_respected():
    api = FakeAPI(failures=[429], retry_after=7)
    sleep = SleepRecorder()
    client = make_client(api, sleep=sleep, backoff=0.1)
    client.complete("x")
    assert sleep.calls == [7.0]


def test_retries_exhausted_gives_one_line_error_and_sdk_does_not_retry():
    api = FakeAPI(failures=[529] * 10)
    client = make_client(api, max_retries=2)
    with pytest.raises(ClaudeAPIError) as ei:
        client.complete("x")
    assert api.n == 3                          # 1 + our 2 retries: the SDK itself never retries
    msg = str(ei.value)
    assert "\n" not in msg and "529" in msg and "overloaded_error" in msg and "3 attempt" in msg
    assert ei.value.status_code == 529 and isinstance(ei.value, UserError)
    assert SECRET not in msg

    api0 = FakeAPI(failures=[529])
    with pytest.raises(ClaudeAPIError):
        make_client(api0, max_retries=0).complete("x")
    assert api0.n == 1


def test_connection_errors_exhausted():
    api = FakeAPI(failures=["connect"] * 5)
    with pytest.raises(ClaudeAPIError) as ei:
        make_client(api, max_retries=1).complete("x")
    assert api.n == 2 and "\n" not in str(ei.value) and "connect" in str(ei.value)


def test_400_not_retried_one_line():
    api = FakeAPI(failures=[400])
    sleep = SleepRecorder()
    client = make_client(api, sleep=sleep)
    with pytest.raises(UserError) as ei:
        client.complete("x")
    assert api.n == 1 and client.n_retries == 0 and sleep.calls == []
    msg = str(ei.value)
    assert "\n" not in msg and "400" in msg and "invalid_request_error" in msg
    assert SECRET not in msg
    assert ei.value.__cause__ is None and ei.value.__suppress_context__   # no SDK exception attached for display


@pytest.mark.parametrize("status", [403, 404])
def test_other_client_errors_not_retried(status):
    api = FakeAPI(failures=[status])
    with pytest.raises(ClaudeAPIError) as ei:
        make_client(api).complete("x")
    assert api.n == 1 and str(ei.value).count("\n") == 0 and str(status) in str(ei.value)


def test_401_key_rejected_without_the_key():
    api = FakeAPI(failures=[401])
    client = make_client(api)
    with pytest.raises(UserError) as ei:
        client.complete("x")
    msg = str(ei.value)
    assert api.n == 1
    assert msg.startswith("the API rejected ANTHROPIC_API_KEY (401")
    assert "\n" not in msg and SECRET not in msg and KEY not in msg


def test_error_message_echoing_the_key_is_scrubbed():
    def handler(request):
        return HTTPX.Response(400, json=error_json("invalid_request_error", f"bad header {KEY}\nsecond line"))
    client = ClaudeClient("claude-test", None, api_key=KEY, sleep=SleepRecorder(),
                          http_client=HTTPX.Client(transport=HTTPX.MockTransport(handler)))
    with pytest.raises(UserError) as ei:
        client.complete("x")
    assert SECRET not in str(ei.value) and "\n" not in str(ei.value) and "***" in str(ei.value)


def test_cache_hit_makes_no_request(tmp_path):
    api = FakeAPI()
    cache = tmp_path / "cache"
    client = make_client(api, cache)
    a = client.complete("prompt A", system="sys")
    assert api.n == 1 and client.n_cache_hits == 0
    assert client.complete("prompt A", system="sys") == a
    assert api.n == 1 and client.n_cache_hits == 1
    client.complete("prompt B", system="sys")
    assert api.n == 2
    client.complete("prompt A", system="other system")
    client.complete("prompt A", system="sys", max_tokens=5)
    assert api.n == 4
    # a fresh client over the same folder hits too
    client2 = make_client(api, cache)
    assert client2.complete("prompt A", system="sys") == a and api.n == 4 and client2.n_requests == 0
    # a different model does not
    make_client(api, cache, model="claude-other").complete("prompt A", system="sys")
    assert api.n == 5

    files = sorted(cache.iterdir())
    assert len(files) == 5 and all(f.suffix == ".json" for f in files)   # no leftover temp files
    for f in files:
        assert SECRET.encode() not in f.read_bytes()
        rec = json.loads(f.read_text())
        assert set(rec) == {"model", "prompt_sha256", "response"}
    key = client.cache_key("prompt A", "sys", 1024, None)
    assert json.loads((cache / f"{key}.json").read_text())["response"] == a


def test_corrupt_cache_file_is_a_miss(tmp_path):
    api = FakeAPI()
    client = make_client(api, tmp_path)
    (tmp_path / f"{client.cache_key('p')}.json").write_text("{not json")
    assert client.complete("p") == "echo: p" and api.n == 1
    assert client.complete("p") == "echo: p" and api.n == 1


def test_no_cache_dir_means_no_cache(tmp_path):
    api = FakeAPI()
    client = make_client(api, None)
    client.complete("p")
    client.complete("p")
    assert api.n == 2 and client.n_cache_hits == 0


def test_missing_key(monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    with pytest.raises(UserError) as ei:
        ClaudeClient("claude-test", None)
    msg = str(ei.value)
    assert "ANTHROPIC_API_KEY" in msg and "\n" not in msg
    with pytest.raises(UserError, match="ANTHROPIC_API_KEY"):
        require_api_key()
    monkeypatch.setenv("ANTHROPIC_API_KEY", "  ")
    with pytest.raises(UserError, match="ANTHROPIC_API_KEY"):
        require_api_key()


def test_key_from_environment(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY + "\n")
    assert require_api_key() == KEY
    api = FakeAPI()
    client = ClaudeClient("claude-test", None, http_client=HTTPX.Client(transport=HTTPX.MockTransport(api)))
    client.complete("x")
    h = api.requests[0].headers
    assert h.get("x-api-key") == KEY or h.get("authorization") == f"Bearer {KEY}"


def test_complete_many_order_and_concurrency(tmp_path):
    api = FakeAPI(delay=0.02)
    client = make_client(api, tmp_path, max_concurrency=3)
    prompts = [f"prompt {i}" for i in range(12)]
    out = client.complete_many(prompts, system="s", max_tokens=20)
    assert out == [f"echo: {p}" for p in prompts]
    assert api.n == 12 and 1 < api.max_active <= 3
    bodies = [json.loads(r.content) for r in api.requests]
    assert all(b["system"] == "s" and b["max_tokens"] == 20 for b in bodies)
    # all cached now
    assert client.complete_many(prompts, system="s", max_tokens=20) == out and api.n == 12
    assert client.n_cache_hits == 12
    assert client.complete_many([]) == []


def test_complete_many_with_retries_stays_bounded():
    api = FakeAPI(failures=[529, 500, 429], delay=0.01)
    client = make_client(api, max_concurrency=2)
    prompts = [str(i) for i in range(8)]
    assert client.complete_many(prompts) == [f"echo: {p}" for p in prompts]
    assert api.max_active <= 2 and client.n_retries == 3 and api.n == 11


def test_complete_many_raises_first_failure():
    api = FakeAPI(failures=[400])
    client = make_client(api, max_concurrency=2)
    with pytest.raises(ClaudeAPIError, match="400"):
        client.complete_many([str(i) for i in range(6)])


def test_repr_has_no_key(tmp_path):
    client = make_client(FakeAPI(), tmp_path)
    assert SECRET not in repr(client) and SECRET not in str(client)
    assert "claude-test" in repr(client)


def test_wrong_http_client_library_is_a_user_error():
    with pytest.raises(UserError):
        ClaudeClient("claude-test", None, api_key=KEY, http_client=object())


def test_default_model_constant():
    assert claude.DEFAULT_MODEL.startswith("claude-")
    try:    # the SDK warns on every call with a model it lists as deprecated
        from anthropic.resources.messages.messages import DEPRECATED_MODELS
    except ImportError:
        DEPRECATED_MODELS = {}
    assert claude.DEFAULT_MODEL not in DEPRECATED_MODELS
