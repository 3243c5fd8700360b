"""The one way to host a gateway on a cluster: attach to the application's controller by name, get
its routing table and pool handles, connect the data plane, and serve. Ray Serve replicas
(`cluster.serve_app`) and `yuan-serve generate --engine ray` both use `attach_backend`.

Beside the engine runs `report_loop`: every `report_every_s` it tells the controller the table
version in use (the acknowledgement a move waits for), the load since the last report and the
gateway's stats; it applies a newer table from the reply between two steps, keeps the other
gateways' stats for ModelInfo and Stats, and sets health NOT_SERVING while some expert has no live
holder. A controller that does not answer costs nothing: the gateway keeps serving on its last
table, and its unsent load goes with the next report that gets through.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import ray
import torch

from cluster.controller import ControlConfig, controller_name, start_controller
from cluster.pools import NAMESPACE, PoolConfig
from gateway.backends import checkpoint_info, engine_info
from gateway.engine import Engine
from gateway.pool_dispatcher import PoolDispatcher
from gateway.server import Backend
from gateway.service import Gateway
from gateway.servicer import ServingState, process_gateway_id
from gateway.tokenizer import load_tokenizer
from model.checkpoint import load_model
from router.load import window

REPORT_EVERY_S = 0.25
REPORT_TIMEOUT_S = 2.0


def gateway_id() -> str:
    """A Serve replica's id, else host and pid."""
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # not a Serve replica  # noqa: BLE001
        return process_gateway_id()


def attach_backend(
    app: str,
    pools: PoolConfig,
    control: ControlConfig = ControlConfig(),
    create: bool = True,
    start_timeout_s: float = 300.0,
) -> Backend:
    """A gateway engine in this process, attached to `app`'s controller (started first when `create`
    and there is none) and its pools. Closing it closes this gateway's connections, never a pool."""
    from cluster.ray_cluster import connect

    connect(pools.address)
    if create:
        controller = start_controller(app, pools, control, start_timeout_s)
    else:
        controller = ray.get_actor(controller_name(app), namespace=NAMESPACE)
    me = gateway_id()
    reply = ray.get(controller.attach.remote(me), timeout=start_timeout_s)
    if pools.gateway_threads:
        torch.set_num_threads(pools.gateway_threads)
    gpu = torch.cuda.is_available()  # Ray made a GPU visible to this process: the model goes there
    model, _ = load_model(pools.model_dir, pools.dtype, huge_pages=not gpu)
    if gpu:
        model.to("cuda")
    dispatcher = PoolDispatcher(
        reply["table"], reply["workers"], pools.transport, model.cfg.num_layers, keys=reply["keys"]
    )
    dispatcher.fetch_table = lambda: ray.get(controller.table_now.remote(), timeout=REPORT_TIMEOUT_S)
    engine = Engine(model, dispatcher, pools.limits, micro_batches=pools.micro_batches)
    info = engine_info(
        engine, pools.pools, pools.replicas, reply["table"].version, [list(w) for w in reply["table"].workers]
    )
    info |= {"app": app} | checkpoint_info(pools.model_dir)

    async def control_loop(gateway: Gateway, state: ServingState) -> None:
        state.cluster = reply["gateways"]
        await report_loop(gateway, state, controller, me)

    return Backend(
        engine,
        load_tokenizer(Path(pools.model_dir), model.cfg),
        info,
        dispatcher.close,
        control_loop,
        gateway_id=me,
    )


async def report_loop(
    gateway: Gateway, state: ServingState, controller, me: str, every_s: float = REPORT_EVERY_S
) -> None:
    dispatcher = gateway.engine.dispatcher
    sent = dispatcher.load.snapshot()
    while True:
        await asyncio.sleep(every_s)
        snap = dispatcher.load.snapshot()
        delta = load_report(window(sent, snap), dispatcher.keys)
        e = gateway.engine.stats()
        stats = {k: e[k] for k in ("running", "waiting", "steps", "admitted")}
        try:
            reply = await asyncio.wait_for(
                controller.report.remote(me, dispatcher.table.version, delta, stats), REPORT_TIMEOUT_S
            )
        except Exception:  # the controller is restarting or busy: keep serving on the last table  # noqa: BLE001
            continue
        sent = snap
        if "table" in reply:
            await gateway.switch_table(reply["table"], reply["workers"], reply["keys"])
        state.cluster = {g: r for g, r in reply["gateways"].items() if g != me}
        await state.set_available(not reply["uncovered"])


def report_once(controller, me: str, dispatcher, timeout_s: float = REPORT_TIMEOUT_S) -> dict:
    """One report for a gateway that runs its engine by hand (benchmarks), applying a newer table at
    once (call it between steps). Sends the load ever seen, so call it once per fresh dispatcher or
    accept the double count; returns the reply."""
    delta = load_report(dispatcher.load.snapshot(), dispatcher.keys)
    reply = ray.get(controller.report.remote(me, dispatcher.table.version, delta, {}), timeout=timeout_s)
    if "table" in reply:
        dispatcher.set_table(reply["table"], reply["workers"], reply["keys"])
    return reply


def load_report(load: dict, keys: list[str]) -> dict:
    """A load window as the controller sums it: arrays as numpy, work per worker name (table indices
    change between tables; names do not)."""

    def name(worker: int) -> str:
        return keys[worker].split("@")[0] if worker < len(keys) else str(worker)

    return {
        "expert_tokens": load["expert_tokens"].numpy(),
        "pair_tokens": load["pair_tokens"].numpy(),
        "worker_pairs": {name(w): n for w, n in load["worker_pairs"].items() if n},
        "worker_compute_s": {name(w): t for w, t in load["worker_compute_s"].items() if t},
    }
