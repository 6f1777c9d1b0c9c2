"""MoE communication per micro-batch: what FSDP does for the experts today against expert parallelism (EP).

    .venv/bin/python benchmarks/moe_comm.py                 # 2-5 minutes on 2 shared CPU cores
    .venv/bin/python benchmarks/moe_comm.py --computed-only

FSDP (FullShard, models/parallel.py) shards every expert over every worker, so each MoE layer all-gathers
all its experts' weights in the forward pass, again in the backward pass, and reduce-scatters their
gradients, every micro-batch, whatever the number of tokens. EP (models/expert_parallel.py) keeps each
expert whole on one worker of the EP group and moves the routed tokens instead: two all-to-alls of token
rows forward (dispatch, combine) and two backward, in proportion to the tokens.

1. Computed (formulas printed) for the moe-small preset and a 16B MoE (DeepSeek-V2-Lite's shape: 64
   experts top-6, hidden 2048) on 8 GPUs per node: bf16 parameters and activations, fp32 gradient
   reduction, as the trainer runs on GPUs; routing uniform.
2. Measured on 2 and 4 gloo workers of this machine (CPU, fp32), one MoE layer of moe-small's shape scaled
   to a quarter (hidden 256, moe_intermediate 176, 32 experts top-4) with 4,096 tokens per worker (the
   ratio of expert weights to routed rows of the preset's 16,384 tokens) and with 384 (the 16B's ratio at
   one sequence of 4,096), routed by a random router: the bytes each worker receives from the
   others, counted from the tensors the collectives moved (the splits of the all-to-alls, FSDP's flat
   shards), and the time of (a) the collectives alone, FSDP's (all-gather, all-gather, reduce-scatter of the
   experts' flat shards, as FSDP2 issues them) against EP's (dispatch and combine, forward and backward,
   around no experts), and (b) the whole layer forward and backward: FSDP2 (``fully_shard``) against EP
   (``shard_experts``), the same grouped GEMM in both. Times are the median of the rounds, each the slowest
   worker's; every variant runs in each round, so load beside the run moves all of them alike.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

GIB, MIB = 1 << 30, 1 << 20

MODELS = {
    # benchmarks/throughput.py's moe-small: every one of the 12 layers is an MoE layer
    "moe-small": dict(moe_layers=12, hidden=1024, moe_intermediate=704, experts=32, top_k=4),
    # DeepSeek-V2-Lite's shape (15.7B parameters, 2.4B active): 26 MoE layers of 64 routed experts, top-6
    # (its 2 shared experts are a dense MLP, sharded by FSDP either way, and not counted here)
    "16B (64 experts top-6)": dict(moe_layers=26, hidden=2048, moe_intermediate=1408, experts=64, top_k=6),
}
MEASURED = dict(hidden=256, moe_intermediate=176, experts=32, top_k=4)


def expert_params(m: dict) -> int:
    """W: one layer's expert parameters (gate, up and down projections of every expert)."""
    return m["experts"] * 3 * m["hidden"] * m["moe_intermediate"]


def fsdp_bytes(m: dict, gpus: int, param: int = 2, reduce: int = 4) -> float:
    """Per GPU, per MoE layer and micro-batch: two all-gathers of W in the parameters' dtype, one
    reduce-scatter in the reduction's dtype; (g - 1) / g of each comes from (goes to) other GPUs."""
    return (gpus - 1) / gpus * expert_params(m) * (2 * param + reduce)


def ep_bytes(m: dict, tokens: int, ep: int, act: int = 2) -> float:
    """Per GPU, per MoE layer and micro-batch: four all-to-alls of T x top_k rows of the hidden size;
    with uniform routing (ep - 1) / ep of the rows go to (come from) other GPUs."""
    return (ep - 1) / ep * 4 * tokens * m["top_k"] * m["hidden"] * act


def computed(gpus: int = 8) -> None:
    print(f"1. Computed: per GPU, {gpus} GPUs per node, bf16 parameters and activations (p = a = 2 bytes), "
          f"fp32 gradient reduction (r = 4)")
    print("   W           = experts x 3 x hidden x moe_intermediate            (one layer's expert parameters)")
    print("   FSDP        = (g-1)/g x W x (2p + r)                             (all-gather fwd + bwd, reduce-scatter)")
    print("   EP          = (ep-1)/ep x 4 x T x top_k x hidden x a             (dispatch + combine, fwd + bwd)")
    print("   FSDP / EP   = W (2p + r) / (4 T top_k hidden a)                  (g = ep)")
    print("   break-even  T = experts x 3 x moe_intermediate x (2p + r) / (4 top_k a) tokens per GPU and micro-batch")
    print("   gathered    = W x p: the experts of one layer FSDP materialises on every GPU (twice with prefetch)")
    for name, m in MODELS.items():
        w = expert_params(m)
        even = m["experts"] * 3 * m["moe_intermediate"] * 8 / (4 * m["top_k"] * 2)
        print(f"\n   {name}: {m['moe_layers']} MoE layers, hidden {m['hidden']}, {m['experts']} experts of "
              f"{m['moe_intermediate']}, top-{m['top_k']}; W = {w / 1e6:.1f}M per layer "
              f"({m['moe_layers'] * w / 1e9:.2f}B experts in all); gathered {w * 2 / GIB:.2f} GiB per layer; "
              f"break-even T = {even:,.0f}")
        print(f"   {'tokens/GPU/micro-batch':>24} {'FSDP/layer':>11} {'EP/layer':>10} {'FSDP/model':>11} "
              f"{'EP/model':>9} {'FSDP/EP':>8}")
        for seqs, seq in ((1, 4096), (2, 4096), (4, 4096)):  # 4 x 4096: as many tokens as moe-small's 8 x 2048
            t = seqs * seq
            f, e = fsdp_bytes(m, gpus), ep_bytes(m, t, gpus)
            print(f"   {f'{t:,} ({seqs} x {seq})':>24} {f / GIB:8.2f} GiB {e / GIB:6.2f} GiB "
                  f"{f * m['moe_layers'] / GIB:7.1f} GiB {e * m['moe_layers'] / GIB:5.1f} GiB {f / e:7.2f}x")
    m, nodes = MODELS["16B (64 experts top-6)"], 2
    t, w = 4096, expert_params(MODELS["16B (64 experts top-6)"])
    full = (gpus * (nodes - 1)) / (gpus * nodes) * w * (2 * 2 + 4)  # the other node's shards, all-gathered and reduced
    hybrid_ep = 2 * (nodes - 1) / nodes * (w / gpus) * 4  # ring all-reduce of a GPU's own experts' gradients, per step
    print(f"\n   Across nodes, 16B, {nodes} nodes x {gpus}, seq 4096 x 1 per micro-batch, bytes per GPU that cross "
          f"the network per MoE layer:")
    print(f"   FullShard over {nodes * gpus} GPUs (the shards on the other node): (n-1)/n x W x (2p + r) = "
          f"{full / GIB:.2f} GiB every micro-batch")
    print(f"   EP {gpus} in the node, HybridShard across nodes:          2 (n-1)/n x W/ep x r   = "
          f"{hybrid_ep / GIB:.2f} GiB once per step (all-reduce of its experts' gradients), "
          f"{full / hybrid_ep:.0f}x less with one micro-batch per step")


def _timed(fn, group) -> float:
    import torch
    import torch.distributed as dist

    dist.barrier(group)
    start = time.perf_counter()
    fn()
    dist.barrier(group)
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=group)
    return elapsed.item()


def _measure(d, shape: dict, token_counts: list[int], rounds: int) -> dict:
    """On each gloo worker, for each number of tokens per worker: bytes received and times of FSDP's and
    EP's collectives, and of the layer forward and backward."""
    import copy

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    from forge_trainer.models.expert_parallel import combine, dispatch, shard_experts

    group = dist.group.WORLD
    hidden, experts, top_k = shape["hidden"], shape["experts"], shape["top_k"]
    cfg = Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=shape["moe_intermediate"],
                         num_experts=experts, num_experts_per_tok=top_k)
    cfg._experts_implementation = "grouped_mm"
    torch.manual_seed(0)
    whole = Qwen3MoeExperts(cfg)
    for p in whole.parameters():
        torch.nn.init.normal_(p, std=0.02)
    fsdp_layer = fully_shard(copy.deepcopy(whole), mesh=init_device_mesh("cpu", (d.world,)))
    ep_layer = copy.deepcopy(whole)
    shard_experts(ep_layer, group)

    # FSDP2's collectives for this module: the flat shards of its parameters, all-gathered forward and
    # backward (reshard after forward), and the flat gradient reduce-scattered
    shard = math.ceil(sum(p.numel() for p in whole.parameters()) / d.world)
    flat_shard, gathered = torch.randn(shard), torch.empty(shard * d.world)
    grads, reduced = torch.randn(shard * d.world), torch.empty(shard)

    def fsdp_comm():
        dist.all_gather_into_tensor(gathered, flat_shard, group=group)
        dist.all_gather_into_tensor(gathered, flat_shard, group=group)
        dist.reduce_scatter_tensor(reduced, grads, group=group)

    router = torch.randn(experts, hidden, generator=torch.Generator().manual_seed(0)) * 0.1
    out = {}
    for tokens in token_counts:
        g = torch.Generator().manual_seed(d.rank)
        x = torch.randn(tokens, hidden, generator=g)
        weights, index = torch.topk(torch.softmax(x @ router.T, dim=-1), top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        upstream = torch.randn(tokens, hidden, generator=g)
        routed = {}

        def ep_comm():  # dispatch and combine, forward and backward, around no experts
            rows = x.clone().requires_grad_()
            r = dispatch(rows, index, experts, group)
            combine(r.rows, weights, r, group).backward(upstream)
            routed["last"] = r

        def step(layer):
            def run():
                layer(x.clone().requires_grad_(), index, weights).backward(upstream)
            return run

        variants = {"FSDP collectives": fsdp_comm, "EP collectives": ep_comm,
                    "FSDP2 layer": step(fsdp_layer), "EP layer": step(ep_layer)}
        times = {name: [] for name in variants}
        for fn in variants.values():  # warm-up
            fn()
        for _ in range(rounds):
            for name, fn in variants.items():
                times[name].append(_timed(fn, group))
        sent, received = routed["last"].bytes_exchanged(d.rank)
        out[tokens] = {"times": {k: statistics.median(v) for k, v in times.items()},
                       # all-gather: the other workers' shards, twice; reduce-scatter (ring): (world - 1) shards
                       "fsdp bytes": 3 * (d.world - 1) * shard * 4,
                       # what this worker receives in the dispatch and the combine, forward and backward
                       "ep bytes": 2 * (received + sent), "rows": routed["last"].rows.shape[0]}
    return out


def measured(worlds: list[int], token_counts: list[int], rounds: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "trainer"))
    from gloo_helpers import on_ranks

    s = MEASURED
    w = s["experts"] * 3 * s["hidden"] * s["moe_intermediate"]
    print(f"\n2. Measured on gloo CPU workers (fp32), one MoE layer: hidden {s['hidden']}, {s['experts']} experts of "
          f"{s['moe_intermediate']}, top-{s['top_k']}; W = {w / 1e6:.2f}M ({w * 4 / MIB:.1f} MiB fp32); "
          f"median of {rounds} rounds")
    print("   computed at this shape, fp32 (p = r = a = 4): FSDP / EP = W x 12 / (4 x T x top_k x hidden x 4) = "
          + ", ".join(f"{w * 12 / (16 * t * s['top_k'] * s['hidden']):.2f}x at T = {t:,}" for t in token_counts))
    for world in worlds:
        with tempfile.TemporaryDirectory() as tmp:
            results = on_ranks(Path(tmp), _measure, s, token_counts, rounds, world=world)
        for tokens in token_counts:
            rs = [r[tokens] for r in results]
            t = rs[0]["times"]
            fsdp = statistics.mean(r["fsdp bytes"] for r in rs)
            ep = statistics.mean(r["ep bytes"] for r in rs)
            print(f"\n   {world} workers, {tokens:,} tokens per worker: bytes each worker receives per micro-batch "
                  f"(mean of the workers)")
            print(f"     FSDP (all-gather x 2, reduce-scatter of the experts) {fsdp / MIB:7.1f} MiB")
            print(f"     EP (4 all-to-alls of the routed rows)                {ep / MIB:7.1f} MiB   FSDP / EP "
                  f"{fsdp / ep:.2f}x   (rows each worker's experts received: {', '.join(str(r['rows']) for r in rs)})")
            comm_f, comm_e, layer_f, layer_e = (t[k] for k in ("FSDP collectives", "EP collectives", "FSDP2 layer",
                                                               "EP layer"))
            print(f"     collectives alone: FSDP  {comm_f * 1e3:6.1f} ms, EP {comm_e * 1e3:6.1f} ms"
                  f"   FSDP / EP {comm_f / comm_e:.2f}x")
            print(f"     layer fwd + bwd:   FSDP2 {layer_f * 1e3:6.1f} ms, EP {layer_e * 1e3:6.1f} ms"
                  f"   FSDP2 / EP {layer_f / layer_e:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="2,4", help="gloo worker counts to measure, comma-separated")
    parser.add_argument("--tokens", default="4096,384",
                        help="tokens per worker and micro-batch, comma-separated (4,096: moe-small's ratio of expert "
                             "weights to routed rows at 16,384 tokens; 384: the 16B's at one 4,096-token sequence)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--computed-only", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs\n")
    computed()
    if not args.computed_only:
        measured([int(w) for w in args.workers.split(",")], [int(t) for t in args.tokens.split(",")], args.rounds)


if __name__ == "__main__":
    main()
