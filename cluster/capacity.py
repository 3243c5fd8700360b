"""Capacity planning on paper: how a model's experts fit onto GPUs and what bounds its decode speed.

Pure arithmetic from the config (no weights), so users can size a cluster before they have one.
Assumes one expert pool per GPU holding an equal block of experts of every layer, a gateway whose
weights and KV/LF cache live on its own device, and decode steps of `batch` tokens per gateway.
Bounds are upper bounds: memory bandwidth (each step reads the weights of every expert it touches
once) and link bandwidth (each token's two expert inputs go out and come back every layer).

With `gateways` G sharing one pool set (attention instances against expert instances, as
MegaScale-Infer and Step-3 run them): each gateway's decode step reads its own weights and the KV of
its batch (the gateway bound); the pools serve each gateway's batch as its own request, reading the
experts it touches, so the pool set's bound is shared by all G. G gateways reach
min(G x gateway bound, pool-set bound); `gateways_per_pool_set` is where the two meet, and each
pool GPU's link then carries that many tokens' expert traffic divided among the GPUs.
"""

from __future__ import annotations

import math

from model.config import YuanConfig, lf_width
from model.params import parameter_counts


def capacity_plan(
    cfg: YuanConfig,
    gpus: int,
    gpu_mem_gb: float,
    hbm_tbs: float = 4.8,
    link_gbs: float = 50.0,
    batch: int = 64,
    context: int = 4096,
    bytes_per_param: int = 2,
    gateways: int = 1,
) -> dict:
    if gpus < 1 or gpu_mem_gb <= 0:
        raise ValueError("gpus must be >= 1 and gpu_mem_gb > 0")
    counts = parameter_counts(cfg)
    L, N, d = cfg.num_layers, cfg.num_experts, cfg.hidden_size
    expert_layer_bytes = counts["params_per_expert"] * bytes_per_param  # one expert, one layer
    expert_bytes = expert_layer_bytes * L  # one expert, every layer
    experts_per_pool = math.ceil(N / gpus)
    pool_bytes = experts_per_pool * expert_bytes
    usable = gpu_mem_gb * 1e9 * 0.9  # leave 10% for activations and the runtime
    spare_replicas = max(0, int((usable - pool_bytes) // expert_bytes)) if pool_bytes <= usable else 0
    gateway_bytes = (counts["total_params"] - counts["expert_params"]) * bytes_per_param
    kv_per_token = 2 * d * bytes_per_param * L  # K and V after projection, every layer
    lf_per_sequence = lf_width(d) * bytes_per_param * L  # the LF state [c1, h], every layer
    # Distinct experts touched per layer by a batch (each token picks top_k of N uniformly).
    touched = N * (1 - (1 - cfg.top_k / N) ** batch)
    step_read_bytes = touched / gpus * expert_layer_bytes * L  # per GPU, all layers
    step_s = step_read_bytes / (hbm_tbs * 1e12)
    moved_per_token = 2 * cfg.top_k * d * bytes_per_param * L  # out and back, every layer
    pool_bound = batch / step_s if step_s else float("inf")  # the pool set, shared by all gateways
    gateway_step_s = (gateway_bytes + batch * (context * kv_per_token + lf_per_sequence)) / (hbm_tbs * 1e12)
    gateway_bound = batch / gateway_step_s
    aggregate = min(gateways * gateway_bound, pool_bound)
    return {
        "gpus": gpus,
        "experts_per_pool": experts_per_pool,
        "bytes_per_expert": expert_bytes,
        "bytes_per_pool": pool_bytes,
        "fits": pool_bytes <= usable,
        "spare_expert_replicas_per_gpu": spare_replicas,
        "gateway_weight_bytes": gateway_bytes,
        "kv_bytes_per_token": kv_per_token,
        "lf_bytes_per_sequence": lf_per_sequence,
        "gateway_cache_bytes": batch * (context * kv_per_token + lf_per_sequence),
        "bytes_moved_per_layer_per_token": moved_per_token // L,
        "bytes_moved_per_token": moved_per_token,
        "experts_touched_per_layer": touched,
        "tokens_per_s_bound_memory": pool_bound,
        "tokens_per_s_bound_link": link_gbs * 1e9 / moved_per_token,
        "gateways": gateways,
        "tokens_per_s_bound_gateway": gateway_bound,
        "gateways_per_pool_set": pool_bound / gateway_bound,
        "tokens_per_s_bound_aggregate": aggregate,
        "link_bytes_per_s_per_pool": aggregate * moved_per_token / gpus,
        "assumptions": {
            "hbm_tbs": hbm_tbs,
            "link_gbs": link_gbs,
            "batch": batch,
            "context": context,
            "bytes_per_param": bytes_per_param,
        },
    }
