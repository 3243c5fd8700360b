"""`yuan-serve`: init-checkpoint, inspect, plan, generate (engine `ray` by default, or `local`), up, client,
stats, bench.

`generate --json` prints exactly one JSON object `{"token_ids", "text", "finish_reason", ...}` on
stdout (generated ids only); scripts depend on that contract. Errors print one line on stderr and
exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from cli import args as cli_args


def cmd_init_checkpoint(args: argparse.Namespace) -> None:
    from model.checkpoint import write_random_checkpoint
    from model.config import preset

    cfg = preset(args.preset)
    if args.dtype:
        cfg = cfg.with_(torch_dtype=args.dtype)
    shard = int(args.shard_mb * 2**20) if args.shard_mb else None
    out = write_random_checkpoint(cfg, args.out, args.seed, args.router_skew, args.format, shard)
    print(f"wrote {args.preset} checkpoint (seed {args.seed}, router skew {args.router_skew}) to {out}")


def cmd_inspect(args: argparse.Namespace) -> None:
    from model.config import YuanConfig, preset
    from model.params import parameter_counts

    cfg = YuanConfig.from_file(Path(args.model) / "config.json") if args.model else preset(args.preset)
    counts = parameter_counts(cfg, args.context)
    if args.json:
        print(json.dumps(counts))
        return
    print(f"total parameters   {counts['total_params'] / 1e9:10.3f} B")
    print(
        f"active per token   {counts['active_params'] / 1e9:10.3f} B  "
        f"({cfg.top_k} of {cfg.num_experts} experts per layer)"
    )
    print(
        f"forward GFLOPs     {counts['gflops_per_token']:10.3f}    per token "
        f"(2 per active parameter, attention over {args.context} tokens of context)"
    )


def cmd_plan(args: argparse.Namespace) -> None:
    from cluster.capacity import capacity_plan
    from model.config import YuanConfig, preset

    cfg = YuanConfig.from_file(Path(args.model) / "config.json") if args.model else preset(args.preset)
    plan = capacity_plan(
        cfg,
        args.gpus,
        args.gpu_mem,
        args.hbm_tbs,
        args.link_gbs,
        args.batch,
        args.context,
        gateways=args.gateways,
    )
    if args.json:
        print(json.dumps(plan))
        return
    gb = 1e9
    print(f"{args.gpus} GPUs x {args.gpu_mem:g} GB, one expert pool each, bf16 weights")
    print(f"  experts per pool           {plan['experts_per_pool']} (of {cfg.num_experts}, every layer)")
    print(
        f"  bytes per pool             {plan['bytes_per_pool'] / gb:8.2f} GB  "
        f"({'fits' if plan['fits'] else 'DOES NOT FIT'}; room for {plan['spare_expert_replicas_per_gpu']} "
        f"more expert replicas per GPU)"
    )
    print(
        f"  gateway weights            {plan['gateway_weight_bytes'] / gb:8.2f} GB, cache "
        f"{plan['gateway_cache_bytes'] / gb:.2f} GB for {args.batch} sequences x {args.context} tokens"
    )
    print(
        f"  moved per layer per token  {plan['bytes_moved_per_layer_per_token'] / 1024:8.1f} KiB "
        f"({plan['bytes_moved_per_token'] / 2**20:.2f} MiB per token over all layers)"
    )
    print(
        f"  pool set bound, memory     {plan['tokens_per_s_bound_memory']:10.0f} tokens/s, all gateways "
        f"(batch {args.batch}, {plan['experts_touched_per_layer']:.1f} experts touched per layer, "
        f"{args.hbm_tbs:g} TB/s)"
    )
    print(
        f"  decode bound, link         {plan['tokens_per_s_bound_link']:10.0f} tokens/s per gateway "
        f"({args.link_gbs:g} GB/s)"
    )
    print(
        f"  gateway bound              {plan['tokens_per_s_bound_gateway']:10.0f} tokens/s per gateway "
        f"(its weights and its batch's KV each step); {plan['gateways_per_pool_set']:.1f} gateways "
        f"saturate one pool set"
    )
    print(
        f"  {args.gateways} gateway(s), aggregate  {plan['tokens_per_s_bound_aggregate']:10.0f} tokens/s; "
        f"{plan['link_bytes_per_s_per_pool'] / gb:.2f} GB/s on each pool GPU's link"
    )


def cmd_generate(args: argparse.Namespace) -> None:
    from gateway.sampling import SamplingParams
    from gateway.tokenizer import load_tokenizer
    from model.checkpoint import demo_checkpoint
    from model.config import YuanConfig

    model_dir = Path(args.model) if args.model else demo_checkpoint()
    cfg = YuanConfig.from_file(model_dir / "config.json")
    tokenizer = load_tokenizer(model_dir, cfg)
    prompt = (
        cli_args.token_ids(args.token_ids) if args.token_ids is not None else tokenizer.encode(args.prompt)
    )
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop_token_ids=tuple(cli_args.token_ids(args.stop_token_ids or "", "--stop-token-ids")),
    )
    from cli.config_flags import given
    from cluster.app_args import EngineArgs
    from gateway.engine import check_request

    args.limits = EngineArgs(**given(args, EngineArgs)).limits()
    params = check_request(cfg, args.limits, "cli", prompt, params)  # before anything starts
    run = _generate_ray if args.engine == "ray" else _generate_local
    token_ids, finish_reason, timing = run(args, str(model_dir), prompt, params)
    text = tokenizer.decode(token_ids, skip_special=True)
    if args.json:
        print(
            json.dumps(
                {
                    "token_ids": token_ids,
                    "text": text,
                    "finish_reason": finish_reason,
                    "timing": {k: round(v, 4) for k, v in timing.items()},
                }
            )
        )
    else:
        print(text)


def _generate_local(args, model_dir: str, prompt: list[int], params) -> tuple[list[int], str, dict]:
    from gateway.engine import local_engine

    t0 = time.perf_counter()
    engine = local_engine(model_dir, args.dtype, args.limits)
    engine.validate("cli", prompt, params)
    t1 = time.perf_counter()
    seq = engine.generate([prompt], params)[0]
    return seq.output_ids, seq.finish_reason, {"startup_s": t1 - t0, "generate_s": time.perf_counter() - t1}


def _generate_ray(args, model_dir: str, prompt: list[int], params) -> tuple[list[int], str, dict]:
    """One generation through the cluster path a served gateway takes: a controller that owns the
    pools, and a gateway (here, in this process) attached to it."""
    import uuid

    import ray

    from cluster.controller import stop_controller
    from cluster.gateway_host import attach_backend
    from cluster.pools import PoolConfig
    from cluster.ray_cluster import connect

    t0 = time.perf_counter()
    started = connect(args.address, num_cpus=None if args.address else max(8, args.pools * args.replicas + 4))
    app = f"generate-{uuid.uuid4().hex[:8]}"
    try:
        backend = attach_backend(
            app,
            PoolConfig(
                model_dir,
                pools=args.pools,
                replicas=args.replicas,
                dtype=args.dtype,
                address=args.address,
                transport=args.transport,
                micro_batches=args.micro_batches,
                limits=args.limits,
            ),
        )
        try:
            t1 = time.perf_counter()
            seq = backend.engine.generate([prompt], params)[0]
            t2 = time.perf_counter()
        finally:
            backend.close()
    finally:
        stop_controller(app)
        if started:
            ray.shutdown()
    timing = {"startup_s": t1 - t0, "generate_s": t2 - t1, "pools": args.pools, "replicas": args.replicas}
    return seq.output_ids, seq.finish_reason, timing


def _bench(args: argparse.Namespace) -> None:
    from bench.serving import run_cli

    run_cli(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="yuan-serve", description="Serve Yuan 2.0-M32 (Attention Router MoE).")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("init-checkpoint", help="write a random-weight checkpoint in the real HF layout")
    s.add_argument("--preset", default="tiny", help="m32, tiny or small")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--router-skew", type=float, default=0.0, help="> 0 makes some experts hotter")
    s.add_argument("--format", choices=["safetensors", "bin"], default="safetensors")
    s.add_argument("--shard-mb", type=float, default=None, help="shard files above this size")
    s.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    s.set_defaults(func=cmd_init_checkpoint)

    s = sub.add_parser("inspect", help="parameter and FLOP counts from a config")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--preset", default="m32")
    g.add_argument("--model", help="checkpoint directory (reads its config.json)")
    s.add_argument("--context", type=int, default=0, help="context length for attention FLOPs")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("plan", help="capacity plan on paper: bytes per pool, bytes moved, tokens/s bounds")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--preset", default="m32")
    g.add_argument("--model", help="checkpoint directory (reads its config.json)")
    s.add_argument("--gpus", type=int, required=True)
    s.add_argument("--gpu-mem", type=float, required=True, help="GB of memory per GPU")
    s.add_argument("--hbm-tbs", type=float, default=4.8, help="GPU memory bandwidth, TB/s (H200: 4.8)")
    s.add_argument("--link-gbs", type=float, default=50.0, help="gateway <-> pool link, GB/s")
    s.add_argument("--batch", type=int, default=64, help="tokens per decode step per gateway")
    s.add_argument("--context", type=int, default=4096)
    s.add_argument("--gateways", type=int, default=1, help="gateways sharing the pool set")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_plan)

    s = sub.add_parser("generate", help="generate a completion")
    s.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="ray",
        help="ray: gateway + expert pools on Ray (default); local: the in-process reference",
    )
    s.add_argument("--pools", type=int, default=4, help="expert pools (ray engine)")
    s.add_argument("--replicas", type=int, default=1, help="replicas of every pool (ray engine)")
    s.add_argument(
        "--transport",
        choices=["dataplane", "ray"],
        default="dataplane",
        help="gateway <-> pool bytes (ray engine)",
    )
    s.add_argument(
        "--micro-batches",
        type=int,
        choices=[1, 2],
        default=1,
        help="2: overlap one half-batch's attention with the other's experts (ray engine)",
    )
    s.add_argument(
        "--address",
        default=None,
        help="join this Ray cluster ('auto', 'ray://host:port'); default: start an embedded one",
    )
    s.add_argument("--model", help="checkpoint directory (default: the demo checkpoint, created once)")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt")
    g.add_argument("--token-ids", help="comma-separated prompt ids, e.g. 1,2,3")
    cli_args.add_sampling_args(s)
    s.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    s.add_argument("--json", action="store_true")
    from cli.config_flags import add_flags
    from cluster.app_args import EngineArgs

    add_flags(s, EngineArgs)  # the engine's cache and scheduling settings, as `up` has them
    s.set_defaults(func=cmd_generate)

    from cli import client, stats, up

    up.add_parser(sub)
    client.add_parser(sub)
    stats.add_parser(sub)
    s = sub.add_parser("bench", help="serving benchmark: in-process vs distributed, side by side")
    s.set_defaults(func=_bench)
    from bench import add_arguments

    add_arguments(s)
    return p


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's (bad flags, files, placements): one line, exit 2. `ConfigError` and
    `PlacementError` are ValueErrors; `CheckpointError` is read from its module only when a command
    loaded it, so one that never loads torch (client, stats) does not load it here."""
    checkpoint = sys.modules.get("model.checkpoint")
    return (ValueError, TimeoutError) + ((checkpoint.CheckpointError,) if checkpoint else ())


def main(argv: list[str] | None = None) -> None:
    from gateway.errors import InvalidRequest

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except InvalidRequest as e:  # also when re-raised from a Ray actor: print the cause alone
        print(f"error: {e.field}: {e.message}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        if not isinstance(e, _user_errors()):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
