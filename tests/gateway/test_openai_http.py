"""The OpenAI-compatible HTTP API (a real gateway server on 127.0.0.1 over the golden fixture): the
real `openai` client, raw HTTP with httpx for SSE framing and every error status, a disconnect
mid-stream, and the metrics a scrape finds."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from procnet import free_port
from conftest import settled_stats

from gateway.backends import local_backend
from gateway.engine import EngineLimits
from gateway.server import GatewayServer, ServerOptions
from protos import serving_pb2_grpc as pb_grpc

TOKEN = "t0ken"
MODEL = "yuan2-m32-tiny-a"  # the fixture checkpoint's folder


@pytest.fixture(scope="module")
def server(fixture_dir):
    import grpc

    srv = GatewayServer(
        lambda: local_backend(str(fixture_dir), EngineLimits(max_tokens=400, max_running=4, max_queue=2)),
        ServerOptions(port=0, http_port=free_port(), token=TOKEN),
    )
    srv.start()
    srv.wait_ready(60)
    channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
    srv.stub = _Authed(pb_grpc.YuanServingStub(channel))
    srv.base = f"http://127.0.0.1:{srv.http_port}"
    yield srv
    channel.close()
    srv.stop(grace_s=0)


class _Authed:
    """The gRPC stub with the bearer token on each Stats call (for `settled_stats`)."""

    def __init__(self, stub) -> None:
        self.stub = stub

    def Stats(self, request):  # noqa: N802 - the rpc's name
        return self.stub.Stats(request, metadata=[("authorization", f"Bearer {TOKEN}")], timeout=10)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key=TOKEN, max_retries=0)


def auth(headers: dict | None = None) -> dict:
    return {"Authorization": f"Bearer {TOKEN}", **(headers or {})}


def test_models_and_golden_completion_from_token_ids(client, golden):
    assert [m.id for m in client.models.list().data] == [MODEL]
    for case in golden["cases"][:3]:
        res = client.completions.create(
            model=MODEL,
            prompt=case["prompt_ids"],
            max_tokens=16,
            temperature=0,
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )
        choice = res.choices[0]
        assert choice.model_extra["token_ids"] == case["generated_ids"]
        assert choice.model_extra["prompt_token_ids"] == case["prompt_ids"]
        assert choice.finish_reason == "length"
        assert (res.usage.prompt_tokens, res.usage.completion_tokens) == (len(case["prompt_ids"]), 16)
        assert res.usage.total_tokens == len(case["prompt_ids"]) + 16


def test_streamed_completion_and_chat(client, golden):
    case = golden["cases"][2]
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=case["prompt_ids"],
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )
    )
    ids = [t for c in chunks for ch in c.choices for t in ch.model_extra.get("token_ids") or []]
    assert ids == case["generated_ids"]
    assert chunks[-1].usage.completion_tokens == 16 and chunks[-1].choices == []
    assert [ch.finish_reason for c in chunks for ch in c.choices][-1] == "length"
    whole = client.completions.create(
        model=MODEL, prompt=case["prompt_ids"], max_tokens=16, temperature=0, extra_body={"ignore_eos": True}
    )
    assert "".join(ch.text for c in chunks for ch in c.choices) == whole.choices[0].text
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    stream = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert stream[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert [c.choices[0].finish_reason for c in stream if c.choices][-1] in ("stop", "length")
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    assert chat.choices[0].message.content == text and chat.choices[0].message.role == "assistant"
    assert stream[-1].usage.completion_tokens == chat.usage.completion_tokens
    assert (
        chat.usage.prompt_tokens == len(b"be brief\nhello<sep>") - len("<sep>") + 1
    )  # byte tokenizer, <sep> one id


def test_logprobs_and_echo(client, golden):
    case = golden["cases"][1]
    res = client.completions.create(
        model=MODEL,
        prompt=case["prompt_ids"],
        max_tokens=4,
        temperature=0,
        logprobs=3,
        echo=False,
        extra_body={"ignore_eos": True},
    )
    lp = res.choices[0].logprobs
    assert len(lp.token_logprobs) == 4 and all(v <= 0 for v in lp.token_logprobs)
    assert all(1 <= len(top) <= 3 for top in lp.top_logprobs)  # keyed by text: ids that decode alike merge
    assert all(
        max(top.values()) == pytest.approx(v) for top, v in zip(lp.top_logprobs, lp.token_logprobs)
    )  # greedy
    echoed = client.completions.create(
        model=MODEL, prompt="ab", max_tokens=3, temperature=0, echo=True, extra_body={"ignore_eos": True}
    )
    assert echoed.choices[0].text.startswith("ab")


def test_sse_framing_is_openais(server, golden):
    case = golden["cases"][0]
    body = {
        "model": MODEL,
        "prompt": case["prompt_ids"],
        "max_tokens": 3,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.stream("POST", server.base + "/v1/completions", json=body, headers=auth(), timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for e in events[:-2]:
        assert e.startswith("data: ") and "\n" not in e
        chunk = json.loads(e[len("data: ") :])
        assert chunk["object"] == "text_completion" and chunk["id"].startswith("cmpl-")


BAD = [
    ("no token", {"model": MODEL, "prompt": "a"}, {}, 401, None),
    ("wrong token", {"model": MODEL, "prompt": "a"}, {"Authorization": "Bearer nope"}, 401, None),
    ("unknown model", {"model": "gpt-4", "prompt": "a"}, None, 404, "model"),
    ("no model", {"prompt": "a"}, None, 400, "model"),
    ("n > 1", {"model": MODEL, "prompt": "a", "n": 2}, None, 400, "n"),
    ("bad prompt", {"model": MODEL, "prompt": {"x": 1}}, None, 400, "prompt"),
    ("id out of vocabulary", {"model": MODEL, "prompt": [1, 99999]}, None, 400, "token_ids"),
    ("max_tokens over limit", {"model": MODEL, "prompt": "a", "max_tokens": 401}, None, 400, "max_tokens"),
    ("temperature", {"model": MODEL, "prompt": "a", "temperature": -1}, None, 400, "temperature"),
    ("top_p", {"model": MODEL, "prompt": "a", "top_p": 2}, None, 400, "top_p"),
    ("logprobs", {"model": MODEL, "prompt": "a", "logprobs": 9}, None, 400, "logprobs"),
    ("penalty", {"model": MODEL, "prompt": "a", "presence_penalty": 1}, None, 400, "presence_penalty"),
    ("stop", {"model": MODEL, "prompt": "a", "stop": [""]}, None, 400, "stop"),
    ("messages", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, None, 400, "messages"),
]  # fmt: skip


@pytest.mark.parametrize("name, body, headers, status, param", BAD, ids=[b[0] for b in BAD])
def test_errors_have_openais_shape_and_status(server, name, body, headers, status, param):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    r = httpx.post(server.base + path, json=body, headers=auth() if headers is None else headers, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param


def test_queue_full_is_429_and_a_disconnect_frees_the_request(server):
    body = {
        "model": MODEL,
        "prompt": [5, 6, 7],
        "max_tokens": 400,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    opened, refused = [], None
    with httpx.Client(base_url=server.base, headers=auth(), timeout=30) as http:
        for _ in range(12):  # 4 run, 2 wait (the limits): one of these is refused
            s = http.stream("POST", "/v1/completions", json=body)
            r = s.__enter__()
            if r.status_code != 200:
                refused = r.read() and r
                s.__exit__(None, None, None)
                break
            opened.append(s)
        assert refused is not None and refused.status_code == 429
        assert refused.json()["error"]["type"] == "rate_limit_exceeded"
        for s in opened:  # clients gone mid-stream
            s.__exit__(None, None, None)
    stats = settled_stats(server.stub, timeout=20)
    assert stats.running == 0 and stats.waiting == 0 and stats.kv_blocks_used == 0


def test_health_and_metrics_count_what_was_served(server, golden):
    assert httpx.get(server.base + "/health").status_code == 200
    before = _scrape(server)
    case = golden["cases"][3]
    body = {
        "model": MODEL,
        "prompt": case["prompt_ids"],
        "max_tokens": 5,
        "temperature": 0,
        "ignore_eos": True,
    }
    for _ in range(3):
        assert (
            httpx.post(server.base + "/v1/completions", json=body, headers=auth(), timeout=30).status_code
            == 200
        )
    time.sleep(0.1)
    after = _scrape(server)
    assert (
        after["yuan_serve:generation_tokens_total"] - before.get("yuan_serve:generation_tokens_total", 0)
        == 15
    )
    assert after["yuan_serve:prompt_tokens_total"] - before.get(
        "yuan_serve:prompt_tokens_total", 0
    ) == 3 * len(case["prompt_ids"])
    assert after["yuan_serve:time_to_first_token_seconds_count"] > 0
    assert after["yuan_serve:time_per_output_token_seconds_count"] > 0
    assert after['yuan_serve:request_success_total{finished_reason="length"}'] >= 3
    assert "yuan_serve:num_requests_running" in after and "yuan_serve:kv_cache_usage_perc" in after
    queried = after["yuan_serve:prefix_cache_queries_total"] - before.get(
        "yuan_serve:prefix_cache_queries_total", 0
    )
    assert queried == 3 * (len(case["prompt_ids"]) - 1)  # each prompt but its last token is looked up
    assert "yuan_serve:prefix_cache_hits_total" in after and "yuan_serve:num_preemptions_total" in after


def _scrape(server) -> dict[str, float]:
    text = httpx.get(server.base + "/metrics").text
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def test_the_grafana_dashboard_shows_the_served_metrics(server):
    """Every metric family the dashboard queries is one /metrics serves."""
    import re
    from pathlib import Path

    dashboard = json.loads(
        (Path(__file__).resolve().parents[2] / "docs" / "grafana-yuan-serve.json").read_text()
    )
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    queried = {
        re.sub(r"_(total|bucket)$", "", m) for e in exprs for m in re.findall(r"yuan_serve:[a-z0-9_]+", e)
    }
    text = httpx.get(server.base + "/metrics").text
    served = {
        re.sub(r"_total$", "", line.split()[2])
        for line in text.splitlines()
        if line.startswith("# TYPE yuan_serve:")
    }
    assert len(queried) >= 9 and queried <= served, queried - served


def test_draining_is_503_on_health_and_new_requests(fixture_dir):
    srv = GatewayServer(lambda: local_backend(str(fixture_dir)), ServerOptions(port=0, http_port=free_port()))
    srv.start()
    srv.wait_ready(60)
    base = f"http://127.0.0.1:{srv.http_port}"
    try:
        assert httpx.get(base + "/health").status_code == 200
        srv.drain()
        assert httpx.get(base + "/health").status_code == 503
        r = httpx.post(base + "/v1/completions", json={"model": MODEL, "prompt": "a"}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
        assert "draining" in r.json()["error"]["message"]
    finally:
        srv.stop(grace_s=0)
