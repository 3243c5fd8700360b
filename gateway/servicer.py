"""The gRPC servicer: translates `yuan.serving.v1` messages to the engine's types and back.

It holds no serving logic. `to_params` is the one place protobuf becomes internal types, and
`status_for` the one place exceptions become gRPC status codes:
bad input -> INVALID_ARGUMENT, queue full -> RESOURCE_EXHAUSTED, not ready or draining ->
UNAVAILABLE, deadline -> DEADLINE_EXCEEDED, a request that failed inside the engine -> INTERNAL.
A failing request never disturbs the others. `add_to_server` registers the service with
deserializers that turn bytes that do not parse (garbage, invalid UTF-8) into a `Malformed`
request, which every method refuses with INVALID_ARGUMENT naming the message type.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from google.protobuf import unknown_fields
from grpc_health.v1 import health_pb2
from google.protobuf.message import DecodeError

from gateway.engine import EngineLimits
from gateway.metrics import ServingMetrics
from gateway.errors import InvalidRequest, QueueFull
from gateway.sampling import SamplingParams
from gateway.service import Gateway, TokenEvent
from gateway.requests import RequestFailed, deltas, make_params
from gateway.tokenizer import Tokenizer
from protos import serving_pb2 as pb
from protos import serving_pb2_grpc as pb_grpc

FINISH = {
    "length": pb.FINISH_REASON_LENGTH,
    "stop": pb.FINISH_REASON_STOP,
    "eod": pb.FINISH_REASON_EOD,
    "cancelled": pb.FINISH_REASON_CANCELLED,
}
SERVICE = pb.DESCRIPTOR.services_by_name["YuanServing"]


class Unavailable(RuntimeError):
    """The server is starting or draining (maps to UNAVAILABLE)."""


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, InvalidRequest):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, QueueFull):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, Unavailable):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc) or "deadline exceeded"
    if isinstance(exc, RequestFailed):
        return grpc.StatusCode.INTERNAL, f"request failed: {exc}"
    return grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"


def process_gateway_id() -> str:
    """A gateway's id where nothing names it better: host and pid."""
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass
class ServingState:
    """What the servicer reads: set once the backend is up; `draining` once shutdown began."""

    gateway: Gateway | None = None
    tokenizer: Tokenizer | None = None
    info: dict | None = None
    draining: bool = False
    inflight: int = 0  # generation RPCs not yet fully written to their clients (drain waits for them)
    gateway_id: str = field(default_factory=process_gateway_id)
    available: bool = True  # False while some expert has no live holder (health NOT_SERVING)
    cluster: dict = field(default_factory=dict)  # every live gateway's stats, as the controller last said
    health: object = None  # the health servicer, set by the server
    metrics: ServingMetrics = field(default_factory=ServingMetrics)

    async def set_available(self, available: bool) -> None:
        """Health SERVING when up, not draining and every expert has a live holder; else NOT_SERVING."""
        self.available = available
        if self.health is None:
            return
        up = available and not self.draining and self.gateway is not None
        status = health_pb2.HealthCheckResponse.SERVING if up else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE.full_name):
            await self.health.set(name, status)

    def ready(self) -> Gateway:
        if self.draining:
            raise Unavailable("server is draining; retry on another replica")
        if self.gateway is None:
            raise Unavailable("server is starting: model and expert pools are loading")
        return self.gateway


@dataclass(frozen=True)
class Malformed:
    """A request whose bytes did not parse as its message type."""

    type_name: str
    error: str


def _parser(cls):
    def parse(data: bytes):
        try:
            return cls.FromString(data)
        except DecodeError as e:  # garbage bytes, invalid UTF-8 in a string field, a truncated message
            return Malformed(cls.DESCRIPTOR.full_name, str(e))

    return parse


def add_to_server(servicer: YuanServingServicer, server) -> None:
    """Register `yuan.serving.v1.YuanServing` as the generated code does, with forgiving parsers."""
    handlers = {}
    for method in SERVICE.methods:
        kind = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = kind(
            getattr(servicer, method.name),
            request_deserializer=_parser(getattr(pb, method.input_type.name)),
            response_serializer=getattr(pb, method.output_type.name).SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)


def check_request(msg) -> None:
    """Refuse a malformed message (naming its type) or one with fields this server does not know."""
    if isinstance(msg, Malformed):
        raise InvalidRequest("request", f"malformed {msg.type_name} message: {msg.error}")
    _reject_unknown_fields(msg)


def _reject_unknown_fields(msg) -> None:
    unknown = unknown_fields.UnknownFieldSet(msg)
    if len(unknown):
        numbers = sorted({f.field_number for f in unknown})
        raise InvalidRequest("request", f"unknown field number(s) {numbers} for {msg.DESCRIPTOR.full_name}")


def to_params(
    req: pb.GenerateRequest, tokenizer: Tokenizer, limits: EngineLimits
) -> tuple[list[int], SamplingParams, list[str]]:
    """Prompt ids, sampling params and stop strings of a request; raises `InvalidRequest`. The checks
    are the ones every front end shares (`gateway.requests.make_params`, then the engine's)."""
    check_request(req)
    if req.text and req.token_ids:
        raise InvalidRequest("prompt", "give only one of text and token_ids")
    params = make_params(
        limits,
        max_tokens=req.max_tokens if req.HasField("max_tokens") else None,
        temperature=req.temperature if req.HasField("temperature") else 0.0,
        top_k=req.top_k if req.HasField("top_k") else 0,
        top_p=req.top_p if req.HasField("top_p") else 1.0,
        seed=req.seed if req.HasField("seed") else None,
        stop=list(req.stop),
        stop_token_ids=list(req.stop_token_ids),
        ignore_eod=req.ignore_eod,
    )
    prompt = list(req.token_ids) if req.token_ids else tokenizer.encode(req.text)
    return prompt, params, list(req.stop)


class YuanServingServicer(pb_grpc.YuanServingServicer):
    def __init__(self, state: ServingState) -> None:
        self.state = state

    def _trailer(self, fault: bool = False) -> tuple:
        """Trailing metadata of every response: which gateway served it (and whether a pool fault
        delayed it)."""
        pairs = (("yuan-gateway", self.state.gateway_id),)
        return pairs + ((("yuan-fault", "pool-failure-recovered"),) if fault else ())

    async def _abort(self, context: grpc.aio.ServicerContext, exc: BaseException) -> None:
        code, message = status_for(exc)
        await context.abort(code, message, trailing_metadata=self._trailer())

    async def _run(
        self, req: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        """The request's stream messages; raises before the first one if the request is refused."""
        arrived = time.perf_counter()
        gateway = self.state.ready()
        prompt, params, stop = to_params(req, self.state.tokenizer, gateway.engine.limits)
        rid = req.request_id or uuid.uuid4().hex
        count = 0
        async for d in deltas(gateway, self.state.tokenizer, rid, prompt, params, stop):
            if d.fault:  # say so at the end: a pool fault delayed this response
                context.set_trailing_metadata(self._trailer(fault=True))
            msg = pb.GenerateStreamResponse(request_id=rid, index=d.index, text=d.text)
            if d.token_id is not None:
                count += 1
                msg.token_id = d.token_id
            if d.finish_reason is not None:
                msg.finish_reason = FINISH[d.finish_reason]
                msg.usage.CopyFrom(pb.Usage(prompt_tokens=len(prompt), completion_tokens=count))
                msg.timings.CopyFrom(_timings(arrived, d.first, d.last, count))
                self.state.metrics.finished(arrived, d.first, d.last, len(prompt), count, d.finish_reason)
            yield msg

    async def Generate(self, request, context):
        context.set_trailing_metadata(self._trailer())
        self.state.inflight += 1
        try:
            ids: list[int] = []
            chunks: list[str] = []
            final = None
            async for msg in self._run(request, context):
                if msg.HasField("token_id"):
                    ids.append(msg.token_id)
                chunks.append(msg.text)
                final = msg
            return pb.GenerateResponse(
                request_id=final.request_id,
                token_ids=ids,
                text="".join(chunks),
                finish_reason=final.finish_reason,
                usage=final.usage,
                timings=final.timings,
            )
        except (InvalidRequest, QueueFull, Unavailable, RequestFailed) as e:
            await self._abort(context, e)
        finally:
            self.state.inflight -= 1

    async def GenerateStream(self, request, context):
        context.set_trailing_metadata(self._trailer())
        self.state.inflight += 1
        try:
            async for msg in self._run(request, context):
                yield msg  # returns once gRPC has taken the message
        except (InvalidRequest, QueueFull, Unavailable, RequestFailed) as e:
            await self._abort(context, e)
        finally:
            self.state.inflight -= 1

    async def Tokenize(self, request, context):
        context.set_trailing_metadata(self._trailer())
        try:
            self.state.ready()
            check_request(request)
        except (InvalidRequest, Unavailable) as e:
            await self._abort(context, e)
        return pb.TokenizeResponse(token_ids=self.state.tokenizer.encode(request.text))

    async def ModelInfo(self, request, context):
        context.set_trailing_metadata(self._trailer())
        try:
            gateway = self.state.ready()
            check_request(request)
        except (InvalidRequest, Unavailable) as e:
            await self._abort(context, e)
        info = self.state.info
        table = getattr(gateway.engine.dispatcher, "table", None)  # live: rebalancing and scaling change it
        workers = [list(w) for w in table.workers] if table else info["workers"]
        pools, replicas = info["pools"], info["replicas"]
        if table is not None and table.version != info["routing_table_version"]:  # moved since start-up
            pools, replicas = len(table.workers), max(len(r) for r in table.replica_lists())
        return pb.ModelInfoResponse(
            config_json=json.dumps(info["config"]),
            num_experts=info["config"]["num_experts"],
            top_k=info["config"]["top_k"],
            pools=pools,
            replicas=replicas,
            routing_table_version=table.version if table else info["routing_table_version"],
            workers=[pb.Worker(worker=i, experts=e) for i, e in enumerate(workers)],
            limits_json=json.dumps(info["limits"]),
            gateway=self.state.gateway_id,
            gateways=self._gateways(gateway),
        )

    async def Stats(self, request, context):
        context.set_trailing_metadata(self._trailer())
        try:
            gateway = self.state.ready()
            check_request(request)
        except (InvalidRequest, Unavailable) as e:
            await self._abort(context, e)
        s = gateway.stats()
        expert_tokens = s.get("expert_tokens", [])
        return pb.StatsResponse(
            running=s["running"],
            waiting=s["waiting"],
            kv_blocks_used=s["kv_blocks_used"],
            kv_blocks_total=s["kv_blocks_total"],
            prefix_cache_queries=s["prefix_cache_queries"],
            prefix_cache_hits=s["prefix_cache_hits"],
            preemptions=s["preemptions"],
            cache_tokens=s["cache_tokens"],
            cache_bytes=s["cache_bytes"],
            steps=s["steps"],
            tokens_sent=s.get("tokens_sent", {}),
            worker_pairs=s.get("worker_pairs", {}),
            num_layers=len(expert_tokens),
            num_experts=len(expert_tokens[0]) if expert_tokens else 0,
            expert_tokens=[n for row in expert_tokens for n in row],
            routing_table_version=s.get("routing_table_version", 0),
            worker_compute_s=s.get("worker_compute_s", {}),
            admitted=s["admitted"],
            queue_delay_s=s["queue_delay_s"],
            gateway=self.state.gateway_id,
            gateways=(gws := self._gateways(gateway)),
            running_total=sum(g.running for g in gws),
            waiting_total=sum(g.waiting for g in gws),
        )

    def _gateways(self, gateway: Gateway) -> list[pb.GatewayInfo]:
        """Every live gateway as the controller last reported them, this one with its live numbers."""
        me = {
            "version": getattr(getattr(gateway.engine.dispatcher, "table", None), "version", 0),
            **gateway.engine.stats(),
        }
        rows = {**self.state.cluster, self.state.gateway_id: me}
        return [
            pb.GatewayInfo(
                gateway=g,
                routing_table_version=r.get("version", 0),
                running=r.get("running", 0),
                waiting=r.get("waiting", 0),
                steps=r.get("steps", 0),
                admitted=r.get("admitted", 0),
            )
            for g, r in sorted(rows.items())
        ]


def _timings(arrived: float, first: TokenEvent | None, last: TokenEvent | None, count: int) -> pb.Timings:
    if first is None or last is None:
        return pb.Timings()
    admitted = first.admitted_at or arrived
    per_token = (last.at - first.at) / (count - 1) if count > 1 else 0.0
    return pb.Timings(
        queue_ms=max(0.0, admitted - arrived) * 1e3,
        ttft_ms=(first.at - arrived) * 1e3,
        per_token_ms=per_token * 1e3,
    )
