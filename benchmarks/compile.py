"""torch.compile per transformer block against eager, with the trainer's own step, in one process.

For each model (a 6.5M-parameter Llama, the cpu-6m preset of benchmarks/throughput.py, and the small MoE
the trainer's tests train), trains the same rows from the same weights with the trainer's build
(FSDP2 on a process group of one, as `forge_trainer.run` does), optimizer and `train_step`: eager, then
compiled per block (`training.compile: true`), their steps alternating (so that a change in a shared
machine's load hits both alike). It prints per variant the first step's seconds, the steady step (median of the
second half) and tokens/s, and then:

  compile cost   = the compiled run's seconds over all steps minus its steps at the steady rate, less
                   the same excess of the eager run (the first-call warm-up both have)
  break-even     = compile cost / (eager steady step - compiled steady step): the steps after which a
                   compiled run has caught up (none when compiled is not faster)
  first eval     = the first validation forward (no_grad, model.eval()) of the compiled model, which
                   compiles the blocks again for inference, against the second one (less eager's same gap)

and the graph breaks: `torch._dynamo.explain` of one plain block (its forward, as the trainer calls
it), and dynamo's graph-break counter over the compiled training run (sharded, backward included).
Inductor's on-disk cache starts empty, as in a new pod (--warm-cache keeps the machine's own).

    .venv/bin/python benchmarks/compile.py                      # both models, CPU
    .venv/bin/python benchmarks/compile.py --models dense --steps 40 --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time

MODELS = {
    # benchmarks/throughput.py's cpu-6m: the 6.5M-class Llama TRAINER_NOTES measures on 2 CPU cores.
    "dense": dict(arch=dict(num_layers=6, hidden_size=256, intermediate_size=768, num_attention_heads=4,
                            max_position_embeddings=256, vocab_size=4096),
                  seq_len=256, micro=16, accum=1, steps=24),
    # tests/trainer/test_train.py's MoE (2 layers x 64, 8 experts, top 2) at the tests' batch of 16 x 64 tokens.
    "moe": dict(arch=dict(family="moe", num_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                          num_key_value_heads=2, num_experts=8, num_experts_per_token=2, moe_intermediate_size=64,
                          max_position_embeddings=128, router_aux_loss_coef=0.1, vocab_size=320),
                seq_len=64, micro=4, accum=4, steps=30),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="dense,moe", help=f"comma-separated, of {','.join(MODELS)}")
    parser.add_argument("--steps", type=int, help="steps per run (default: per model)")
    parser.add_argument("--threads", type=int, help="torch's intra-op threads (default: torch's own, one per core)")
    parser.add_argument("--warm-cache", action="store_true",
                        help="use Inductor's on-disk cache as it is (default: an empty one, as a new pod starts with)")
    return parser.parse_args(argv)


def trainer_config(shape: dict, steps: int, compile: bool):
    from forge_trainer.config import TrainerConfig

    return TrainerConfig.model_validate({
        "model": {"architecture": shape["arch"]},
        "data": {"sources": [{"name": "random", "path": "/dev/null"}]},
        "training": {"seq_len": shape["seq_len"], "micro_batch_sequences": shape["micro"],
                     "global_batch_sequences": shape["micro"] * shape["accum"], "precision": "fp32",
                     "compile": compile, "warmup_steps": 0, "schedule": "constant", "budget": {"max_steps": steps}},
    })


class Run:
    """One model (eager or compiled per block) trained step by step on the rows every run shares."""

    def __init__(self, shape: dict, steps: int, compile: bool, d, rows):
        from forge_trainer.methods.pretrain import Pretrain
        from forge_trainer.models.build import build_model, hf_config
        from forge_trainer.runtime.optim import build_optimizer

        config = trainer_config(shape, steps, compile)
        self.shape, self.d, self.rows, self.t = shape, d, rows, config.training
        self.model = build_model(config, hf_config(config, shape["arch"]["vocab_size"], 0), d, False)
        self.optimizer = build_optimizer(self.model, self.t, d.device)
        self.method = Pretrain(config)  # its loss only
        self.seconds: list[float] = []
        self.losses: list[float] = []
        self.evals: list[float] = []

    def step(self, i: int) -> None:
        from forge_trainer.train import train_step

        n = self.shape["micro"] * self.shape["accum"]
        t0 = time.perf_counter()
        loss, _, _ = train_step(self.model, self.optimizer, self.method, self.rows[i * n: (i + 1) * n],
                                self.shape["accum"], self.shape["micro"], self.t.grad_clip, contextlib.nullcontext(),
                                self.d)
        self.losses.append(loss.item())
        self.seconds.append(time.perf_counter() - t0)

    def evaluate(self) -> None:
        """One validation forward, as the method's evaluate runs it (no_grad, eval mode)."""
        import torch

        batch = torch.as_tensor(self.rows[: self.shape["micro"]])
        t0 = time.perf_counter()
        with torch.no_grad():
            self.model.eval()
            self.method.forward(self.model, batch[:, :-1])
            self.model.train()
        self.evals.append(time.perf_counter() - t0)

    @property
    def steady(self) -> float:
        return statistics.median(self.seconds[len(self.seconds) // 2:])

    @property
    def excess(self) -> float:
        """Seconds the run took beyond its steps at the steady rate: first-call and compile time."""
        return sum(self.seconds) - len(self.seconds) * self.steady


def explain_block(shape: dict) -> list[str]:
    """The graph breaks dynamo finds in one plain (unsharded) block's forward, with the inputs the model gives it."""
    import torch

    from forge_trainer.models.build import build_model, hf_config
    from forge_trainer.models.parallel import blocks

    config = trainer_config(shape, 1, False)
    model = build_model(config, hf_config(config, shape["arch"]["vocab_size"], 0))
    block = blocks(model)[0]
    seen = {}
    hook = block.register_forward_pre_hook(lambda m, a, k: seen.update(args=a, kwargs=k), with_kwargs=True)
    with torch.no_grad():
        model(input_ids=torch.randint(0, model.config.vocab_size, (2, shape["seq_len"])))
    hook.remove()
    torch._dynamo.reset()
    e = torch._dynamo.explain(block)(*seen["args"], **seen["kwargs"])
    out = [f"{e.graph_count} graph(s), {e.graph_break_count} break(s)"]
    for b in e.break_reasons:
        where = b.user_stack[-1] if b.user_stack else None
        out.append(f"  {b.reason.splitlines()[0][:160]}" + (f" ({where.filename}:{where.lineno})" if where else ""))
    torch._dynamo.reset()
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    if not args.warm_cache:  # before torch: compiled kernels of earlier runs would make compiling look free
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="forge-compile-bench-")
    import numpy as np
    import torch

    from forge_trainer.runtime.dist import init_distributed, shutdown

    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n for n in args.models.split(",") if n]
    d = init_distributed()
    try:
        print(f"torch {torch.__version__}, {d.device.type}, {torch.get_num_threads()} threads, fp32, "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, "
              f"{'warm' if args.warm_cache else 'empty'} Inductor cache")
        for name in names:
            shape = MODELS[name]
            steps = args.steps or shape["steps"]
            tokens = shape["micro"] * shape["accum"] * shape["seq_len"]
            print(f"\n== {name}: {shape['arch']}, {shape['micro']} x {shape['accum']} x {shape['seq_len']} "
                  f"= {tokens:,} tokens per step, {steps} steps per run")
            print("graph breaks, torch._dynamo.explain of one block:")
            for line in explain_block(shape):
                print("  " + line)
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
            rng = np.random.default_rng(0)
            rows = rng.integers(0, shape["arch"]["vocab_size"], dtype=np.int64,
                                size=(steps * shape["micro"] * shape["accum"], shape["seq_len"] + 1))
            Run(shape, 1, False, d, rows).step(0)  # the process's own first-call costs, outside both runs
            e, c = Run(shape, steps, False, d, rows), Run(shape, steps, True, d, rows)
            for i in range(steps):  # alternating, so that a change in the machine's load hits both alike
                e.step(i)
                c.step(i)
            for _ in range(2):
                e.evaluate()
                c.evaluate()
            breaks = dict(torch._dynamo.utils.counters["graph_break"])
            graphs = torch._dynamo.utils.counters["stats"].get("unique_graphs", 0)
            for label, r in (("eager", e), ("compiled", c)):
                print(f"  {label:<9} first step {r.seconds[0]:7.2f} s | steady step {r.steady * 1000:8.1f} ms "
                      f"| {tokens / r.steady:>9,.0f} tokens/s | first/second eval forward {r.evals[0]:.2f} / "
                      f"{r.evals[1]:.3f} s | loss {r.losses[0]:.4f} -> {r.losses[-1]:.4f}")
            cost, saving = c.excess - e.excess, e.steady - c.steady
            recompile = (c.evals[0] - c.evals[1]) - (e.evals[0] - e.evals[1])
            print(f"compiled / eager steady tokens/s: x{e.steady / c.steady:.2f}")
            print(f"compile cost: {cost:.1f} s over the first steps, {recompile:.1f} s more in the first evaluation")
            if saving > 0:
                print(f"break-even: after {cost / saving:,.0f} steps ({cost / saving * tokens:,.0f} tokens); "
                      f"with the first evaluation's recompile: {(cost + recompile) / saving:,.0f} steps")
            else:
                print("break-even: never (compiled is not faster here)")
            print(f"dynamo over the compiled run: {graphs} unique graph(s), graph breaks: "
                  + (", ".join(f"{reason[:120]!r} x{n}" for reason, n in breaks.items()) or "none"))
            loss_gap = max(abs(a - b) for a, b in zip(e.losses, c.losses))
            print(f"load average now: {os.getloadavg()[0]:.1f}")
            print(f"largest loss difference compiled vs eager over the run: {loss_gap:.2e}")
    finally:
        shutdown(d)


if __name__ == "__main__":
    main()
