"""The OpenAI-compatible HTTP API of one gateway, served by the gateway itself beside its gRPC port
(same process, same event loop, same engine): `GET /v1/models`, `GET /health`, `POST
/v1/completions`, `POST /v1/chat/completions` (Yuan 2 chat template, `gateway/chat.py`), and `GET
/metrics` (Prometheus text, `gateway/metrics.py`).

Requests are checked by the same code as gRPC (`gateway.requests.make_params`, then the engine), and
errors come in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`: 400 naming the
field, 401 for a missing, wrong or repeated bearer token (the server's `token`), 404 for an unknown
model, 429 when the queue is full, 503 while starting or draining, 500 when an accepted request
failed in the engine. Streams are server-sent events ending with `data: [DONE]`; a client that goes
away mid-stream cancels its request, which frees its cache at the next step. Fields OpenAI defines
that this server does not use are ignored; those it cannot honour (`n` > 1, penalties, `suffix`,
`best_of` > 1) are refused by name. vLLM's extensions tools rely on are taken: `top_k`,
`ignore_eos`, `stop_token_ids`, `return_token_ids`.
"""

from __future__ import annotations

import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gateway.chat import ChatTemplate
from gateway.errors import InvalidRequest, QueueFull
from gateway.requests import RequestFailed, deltas, make_params
from gateway.servicer import ServingState, Unavailable

FINISH = {"eod": "stop", "stop": "stop", "length": "length", "cancelled": "abort"}


class HttpError(Exception):
    def __init__(
        self, status: int, message: str, kind: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def as_http(exc: BaseException) -> HttpError:
    if isinstance(exc, HttpError):
        return exc
    if isinstance(exc, InvalidRequest):
        return HttpError(400, str(exc), "invalid_request_error", exc.field)
    if isinstance(exc, QueueFull):
        return HttpError(429, str(exc), "rate_limit_exceeded", code="queue_full")
    if isinstance(exc, Unavailable):
        return HttpError(503, str(exc), "service_unavailable")
    if isinstance(exc, RequestFailed):
        return HttpError(500, f"request failed: {exc}", "internal_error")
    return HttpError(500, f"{type(exc).__name__}: {exc}", "internal_error")


def _field(body: dict, name: str, kinds: tuple, default=None):
    """body[name] if it is one of `kinds` (a bool is no int here), else a 400 naming it."""
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise InvalidRequest(name, f"must be {' or '.join(k.__name__ for k in kinds)}, got {value!r}")
    return value


class OpenAIFront:
    def __init__(self, state: ServingState, token: str | None = None, model_name: str | None = None) -> None:
        self.state, self.model_name = state, model_name
        self.expected = f"Bearer {token}".encode() if token else None
        self._chat: ChatTemplate | None = None
        self.app = Starlette(routes=[
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
        ])  # fmt: skip

    # ---- plumbing -------------------------------------------------------------------------------
    @property
    def model(self) -> str:
        return self.model_name or (self.state.info or {}).get("model", "yuan")

    def _authorize(self, request: Request) -> None:
        if self.expected is None:
            return
        given = request.headers.getlist("authorization")
        value = given[0].encode() if len(given) == 1 else b""
        if len(given) != 1 or not hmac.compare_digest(value, self.expected):
            raise HttpError(
                401, "missing or wrong bearer token", "authentication_error", code="invalid_api_key"
            )

    async def _body(self, request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as e:
            raise InvalidRequest("body", f"is not valid JSON: {e}") from e
        if not isinstance(body, dict):
            raise InvalidRequest("body", "must be a JSON object")
        model = body.get("model")
        if model is None:
            raise InvalidRequest("model", "is required")
        if model != self.model:
            raise HttpError(
                404,
                f"The model `{model}` does not exist; this server serves `{self.model}`",
                "invalid_request_error",
                "model",
                "model_not_found",
            )
        return body

    # ---- endpoints ------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        up = self.state.gateway is not None and not self.state.draining and self.state.available
        return Response(status_code=200 if up else 503)

    async def metrics(self, request: Request) -> Response:
        return Response(self.state.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def models(self, request: Request) -> Response:
        try:
            self._authorize(request)
        except HttpError as e:
            return e.response()
        return JSONResponse(
            {
                "object": "list",
                "data": [{"id": self.model, "object": "model", "created": 0, "owned_by": "yuan-serve"}],
            }
        )

    async def completions(self, request: Request) -> Response:
        return await self._serve(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, chat=True)

    # ---- one request ------------------------------------------------------------------------------
    async def _serve(self, request: Request, chat: bool) -> Response:
        arrived = time.perf_counter()
        self.state.inflight += 1
        handed_over = False
        try:
            self._authorize(request)
            gateway = self.state.ready()
            body = await self._body(request)
            prompt, params, stop, opts = self._parse(body, chat, gateway.engine.limits)
            rid = uuid.uuid4().hex
            params = gateway.check(rid, prompt, params)  # refusals (bad values, queue full) before a 200
            events = deltas(gateway, self.state.tokenizer, rid, prompt, params, stop)
            run = _Run(self, rid, prompt, opts, chat, arrived, events)
            if opts["stream"]:
                handed_over = True
                return StreamingResponse(
                    run.sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
                )
            return JSONResponse(await run.whole())
        except Exception as e:  # noqa: BLE001 - every failure becomes an OpenAI-shaped error
            return as_http(e).response()
        finally:
            if not handed_over:
                self.state.inflight -= 1

    def _parse(self, body: dict, chat: bool, limits) -> tuple[list[int], object, list[str], dict]:
        tokenizer = self.state.tokenizer
        if chat:
            if self._chat is None:
                self._chat = self.state.info.get("chat_template") or ChatTemplate()
            prompt = tokenizer.encode(self._chat.render(body.get("messages")))
            max_tokens = _field(body, "max_completion_tokens", (int,)) or _field(body, "max_tokens", (int,))
            if body.get("logprobs"):
                raise InvalidRequest(
                    "logprobs", "is not supported for chat completions (use /v1/completions)"
                )
        else:
            raw = body.get("prompt")
            if isinstance(raw, list) and len(raw) == 1 and isinstance(raw[0], (str, list)):
                raw = raw[0]  # a batch of one
            if isinstance(raw, str):
                prompt = tokenizer.encode(raw)
            elif isinstance(raw, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in raw):
                prompt = list(raw)
            else:
                raise InvalidRequest("prompt", "must be a string or a list of token ids (batches of one)")
            max_tokens = _field(body, "max_tokens", (int,), 16)
        n = _field(body, "n", (int,), 1)
        if n != 1:
            raise InvalidRequest("n", f"only n=1 is supported, got {n}")
        for name in ("frequency_penalty", "presence_penalty"):
            if _field(body, name, (int, float), 0) != 0:
                raise InvalidRequest(name, "is not supported (only 0)")
        if _field(body, "best_of", (int,), 1) != 1:
            raise InvalidRequest("best_of", "only 1 is supported")
        if body.get("suffix") is not None:
            raise InvalidRequest("suffix", "is not supported")
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else stop or []
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise InvalidRequest("stop", "must be a string or a list of strings")
        stream_options = _field(body, "stream_options", (dict,), {})
        top_k = _field(body, "top_k", (int,), 0)
        params = make_params(
            limits,
            max_tokens=max_tokens,
            temperature=float(_field(body, "temperature", (int, float), 1.0)),
            top_k=0 if top_k == -1 else top_k,  # vLLM's -1 means off too
            top_p=float(_field(body, "top_p", (int, float), 1.0)),
            seed=_field(body, "seed", (int,)),
            stop=stop,
            stop_token_ids=_field(body, "stop_token_ids", (list,), []),
            ignore_eod=bool(_field(body, "ignore_eos", (bool,), False)),
            logprobs=None if chat else _field(body, "logprobs", (int,)),
        )
        opts = {
            "stream": bool(_field(body, "stream", (bool,), False)),
            "usage_in_stream": bool(stream_options.get("include_usage", False)),
            "echo": bool(_field(body, "echo", (bool,), False)) and not chat,
            "token_ids": bool(_field(body, "return_token_ids", (bool,), False)),
        }
        return prompt, params, stop, opts


class _Run:
    """A request in flight: the whole answer, or its server-sent events."""

    def __init__(
        self,
        front: OpenAIFront,
        rid: str,
        prompt: list[int],
        opts: dict,
        chat: bool,
        arrived: float,
        events: AsyncIterator,
    ) -> None:
        self.front, self.prompt, self.opts, self.chat, self.arrived = front, prompt, opts, chat, arrived
        self.events = events
        self.id = ("chatcmpl-" if chat else "cmpl-") + rid
        self.created = int(time.time())
        self.tokens: list[int] = []
        self.logprobs = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        self.text_len = 0

    def _take(self, d) -> None:
        tok = self.front.state.tokenizer
        if d.token_id is not None:
            self.tokens.append(d.token_id)
            if d.logprob is not None:
                lp = self.logprobs
                lp["tokens"].append(tok.decode([d.token_id]))
                lp["token_logprobs"].append(d.logprob)
                top: dict[str, float] = {}
                for t, v in (
                    d.top_logprobs or {}
                ).items():  # most likely first: ids that decode alike keep it
                    top.setdefault(tok.decode([t]), v)
                lp["top_logprobs"].append(top)
                lp["text_offset"].append(self.text_len)
        self.text_len += len(d.text)
        if d.finish_reason is not None:
            self.front.state.metrics.finished(
                self.arrived, d.first, d.last, len(self.prompt), len(self.tokens), d.finish_reason
            )

    def _usage(self) -> dict:
        n = len(self.tokens)
        return {
            "prompt_tokens": len(self.prompt),
            "completion_tokens": n,
            "total_tokens": len(self.prompt) + n,
        }

    def _prefix(self) -> str:
        return self.front.state.tokenizer.decode(self.prompt) if self.opts["echo"] else ""

    async def whole(self) -> dict:
        parts, reason = [self._prefix()], None
        async for d in self.events:
            self._take(d)
            parts.append(d.text)
            reason = d.finish_reason or reason
        text = "".join(parts)
        if self.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": FINISH.get(reason, reason),
            }
        else:
            choice = {
                "index": 0,
                "text": text,
                "logprobs": self._logprobs(),
                "finish_reason": FINISH.get(reason, reason),
            }
        if self.opts["token_ids"]:
            choice |= {"token_ids": self.tokens, "prompt_token_ids": self.prompt}
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.front.model,
            "choices": [choice],
            "usage": self._usage(),
        }

    def _logprobs(self) -> dict | None:
        return self.logprobs if self.logprobs["tokens"] else None

    def _chunk(self, choice: dict | None, usage: dict | None = None) -> str:
        body = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.front.model,
            "choices": [choice] if choice else [],
        }
        if self.opts["usage_in_stream"]:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    async def sse(self) -> AsyncIterator[str]:
        try:
            if self.chat:
                yield self._chunk(
                    {
                        "index": 0,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                )
            prefix = self._prefix()
            async for d in self.events:
                seen = len(self.logprobs["tokens"])
                self._take(d)
                text, prefix = prefix + d.text, ""
                reason = FINISH.get(d.finish_reason, d.finish_reason)
                if self.chat:
                    delta = {"content": text} if text else {}
                    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
                else:
                    new = (
                        {k: v[seen:] for k, v in self.logprobs.items()}
                        if self.logprobs["tokens"][seen:]
                        else None
                    )
                    choice = {"index": 0, "text": text, "logprobs": new, "finish_reason": reason}
                    if self.opts["token_ids"]:
                        choice["token_ids"] = [d.token_id] if d.token_id is not None else []
                if text or reason or (choice.get("token_ids")):
                    yield self._chunk(choice)
            if self.opts["usage_in_stream"]:
                yield self._chunk(None, self._usage())
            yield "data: [DONE]\n\n"
        except Exception as e:  # noqa: BLE001 - the status is sent already: the error goes in the stream
            yield f"data: {json.dumps(as_http(e).body())}\n\n"
        finally:
            await self.events.aclose()  # a client gone mid-stream cancels the request
            self.front.state.inflight -= 1
