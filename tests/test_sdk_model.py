"""The model client against the scripted model server: streaming, retries, and every failure named."""

from __future__ import annotations

import time

import pytest

from codeact_sdk import ConfigError, ModelAuthError, ModelConnectionError, ModelError, ModelTimeout
from codeact_sdk.model import ModelClient
from codeact_sdk.testing import Fault, ScriptedModelServer

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
def model():
    with ScriptedModelServer() as server:
        yield server


def client(model, **options) -> ModelClient:
    options.setdefault("request_timeout", 10)
    return ModelClient(model.url, **options)


def drain(generator):
    pieces = []
    while True:
        try:
            pieces.append(next(generator))
        except StopIteration as finished:
            return pieces, finished.value


def test_plain_and_streamed_completions_cut_at_the_stop_sequence(model):
    model.enqueue("<execute>1+1</execute> ignored", "streamed <execute>2+2</execute> ignored")
    assert client(model).complete(MESSAGES, stop=["</execute>"]).text == "<execute>1+1"
    pieces, completion = drain(client(model).stream(MESSAGES, stop=["</execute>"]))
    assert len(pieces) > 3 and "".join(pieces) == completion.text == "streamed <execute>2+2"
    assert completion.usage["completion_tokens"] > 0 and completion.first_token_seconds is not None
    assert model.requests[-1]["stop"] == ["</execute>"] and model.requests[-1]["stream"] is True


def test_the_only_listed_model_is_used_when_none_is_given(model):
    model.enqueue("ok")
    assert client(model).complete(MESSAGES).text == "ok"
    assert model.requests[-1]["model"] == "scripted"


def test_several_listed_models_need_an_explicit_choice():
    with ScriptedModelServer(models=("a", "b")) as server, pytest.raises(ConfigError, match="CODEACT_MODEL"):
        ModelClient(server.url).model  # noqa: B018


def test_server_errors_are_retried_with_backoff(model):
    model.enqueue(Fault(status=500), Fault(status=503), "recovered")
    assert client(model).complete(MESSAGES).text == "recovered"
    assert len(model.requests) == 3


def test_429_honours_retry_after(model):
    model.enqueue(Fault(status=429, retry_after=1.2), "after the wait")
    started = time.monotonic()
    assert client(model, max_retries=1).complete(MESSAGES).text == "after the wait"
    assert time.monotonic() - started >= 1.2


def test_retries_give_up_with_the_status_and_url(model):
    model.enqueue(*[Fault(status=500)] * 3)
    with pytest.raises(ModelError, match="answered 500") as caught:
        client(model, max_retries=2).complete(MESSAGES)
    assert model.url in str(caught.value) and caught.value.status == 500


def test_bad_api_key_is_a_permission_error_naming_the_option():
    with ScriptedModelServer(api_key="right") as server:
        with pytest.raises(ModelAuthError, match="CODEACT_API_KEY") as caught:
            ModelClient(server.url, model="scripted", api_key="wrong").complete(MESSAGES)
        assert isinstance(caught.value, PermissionError)
        server.enqueue("welcome")
        assert ModelClient(server.url, model="scripted", api_key="right").complete(MESSAGES).text == "welcome"


def test_model_server_down_is_a_connection_error_naming_the_url():
    url = "http://127.0.0.1:9/v1"
    with pytest.raises(ModelConnectionError, match="CODEACT_LLM_URL") as caught:
        ModelClient(url, model="m", max_retries=1).complete(MESSAGES)
    assert isinstance(caught.value, ConnectionError) and url in str(caught.value)


def test_cut_off_and_malformed_streams_are_errors_not_hangs(model):
    model.enqueue(Fault(text="partial answer", cut=True), Fault(text="partial", malformed=True))
    with pytest.raises(ModelError):
        drain(client(model).stream(MESSAGES))
    with pytest.raises(ModelError, match="malformed"):
        drain(client(model).stream(MESSAGES))


def test_a_stalled_stream_times_out(model):
    model.enqueue(Fault(text="slow", delay=2.0))
    with pytest.raises(ModelTimeout) as caught:
        drain(client(model, request_timeout=0.5).stream(MESSAGES))
    assert isinstance(caught.value, TimeoutError)
