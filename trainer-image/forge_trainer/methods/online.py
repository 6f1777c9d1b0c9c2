"""What grpo and online-dpo share: the prompt set, sampling groups of completions from the policy's current
weights, scoring them with the reward functions, the frozen reference, and the figures of each step.

The rollout is a step of the method's batches: ``next_step`` takes the step's prompts (a fixed shuffle of the
prompt set, epoch after epoch; each rank takes its share), generates ``group_size`` completions for each with
the policy (Hugging Face ``generate``, batched, with a key/value cache; every rank runs the same number of
decoding steps, as FSDP needs), scores them on the rank that made them, and hands the loop the rows the
method's loss reads. The sampler's randomness is a function of (training.seed, generation, rank), so a resumed
run samples exactly what the uninterrupted one would have.
"""

from __future__ import annotations

import math
import time
import zlib

import numpy as np
import torch

from ..config import TrainerConfig
from ..contract import ConfigError
from ..data.prompts import PromptSet, load_prompts
from ..data.records import ChatRenderer
from ..data.tokenizer import TextTokenizer
from ..models.logprobs import token_logprobs
from ..rewards import Rewards, Scores, build_rewards
from ..runtime.dist import Dist
from ..runtime.signals import SigtermFlag
from .base import Dataset


class Rollouts:
    """Prompts, sampling and scoring, for one method run; ``start`` hands it the model."""

    def __init__(self, config: TrainerConfig):
        self.config = config
        self.settings = config.method
        self.prompts: PromptSet | None = None
        self.rewards: Rewards | None = None
        self.tokenizer: TextTokenizer | None = None
        self.model = self.reference = self.autocast = self.d = None
        self.figures = Figures([r.name for r in self.settings.rewards])

    def prepare(self, d: Dist, stop: SigtermFlag) -> Dataset:
        """Every rank loads the tokenizer, the prompt set and the reward functions (a bad one fails on every
        rank before the model is built)."""
        def load() -> None:
            self.tokenizer = tok = TextTokenizer.from_pretrained(self.config.tokenizer.path or self.config.model.base_path)
            renderer = ChatRenderer(tok)
            self.prompts = load_prompts(self.config, tok, renderer)
            if any(self.prompts.chat):
                tok.chat_template = renderer.template
                end = renderer.end_of_turn()
                if end is not None and end != tok.eos_id:
                    tok.stop_ids = [tok.eos_id, end]
            self.rewards = build_rewards(self.settings.rewards)
            self.rewards.check_columns(list(self.prompts.columns))

        d.on_every_rank(load, "loading the prompts and the reward functions")
        digest = d.on_main(lambda: self.prompts.digest, "reading the prompt set")
        return Dataset(tokenizer=self.tokenizer, digest=digest, provenance=self.prompts.provenance)

    def start(self, model: torch.nn.Module, autocast, d: Dist, reference: bool, prompts_per_step: int) -> None:
        """Keep the model; with ``reference``, a frozen copy of the starting weights (whole on every rank)."""
        if prompts_per_step % d.world:
            raise ConfigError(f"{prompts_per_step} prompts per step (training.global_batch_sequences over "
                              f"method.group_size) is not a multiple of the {d.world} workers")
        self.model, self.autocast, self.d = model, autocast, d
        if reference:
            self.reference = frozen_copy(model, d)

    def order(self, k: int) -> int:
        """The prompt drawn k-th: epoch after epoch, each a fixed shuffle of the prompt set."""
        n = len(self.prompts)
        epoch, at = divmod(k, n)
        perm = np.random.default_rng([self.config.training.seed, epoch]).permutation(n)
        return int(perm[at])

    @torch.no_grad()
    def sample(self, indices: list[int], generation: int) -> Sample:
        """``group_size`` completions for each prompt of ``indices`` (this rank's), scored."""
        s, d, tok = self.settings, self.d, self.tokenizer
        t0 = time.monotonic()
        ids = [self.prompts.ids[i] for i in indices for _ in range(s.group_size)]
        width = max(map(len, ids))
        pad = tok.eos_id
        x = torch.tensor([[pad] * (width - len(p)) + p for p in ids], device=d.device)
        attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids], device=d.device)
        from transformers import GenerationConfig

        gen = GenerationConfig(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=0,
                               max_new_tokens=s.max_new_tokens, eos_token_id=list(tok.stop_ids), pad_token_id=pad)
        seed = zlib.crc32(f"{self.config.training.seed}:{generation}:{d.rank}".encode())
        self.model.eval()
        with torch.random.fork_rng(devices=[d.device] if d.device.type == "cuda" else []), self.autocast:
            torch.manual_seed(seed)
            out = self.model.generate(input_ids=x, attention_mask=attn, generation_config=gen,
                                      synced_gpus=d.distributed)
        self.model.train()
        completion = out[:, width:]
        stops = torch.isin(completion, torch.tensor(tok.stop_ids, device=d.device))
        first = torch.where(stops.any(1), stops.int().argmax(1) + 1, torch.full_like(stops[:, 0], completion.shape[1],
                                                                                        dtype=torch.long))
        lengths = first.tolist()
        texts = [tok.tok.decode(completion[i, : n - int(bool(stops[i, n - 1])) if n else 0].tolist(),
                                skip_special_tokens=True) for i, n in enumerate(lengths)]
        gen_seconds = time.monotonic() - t0
        prompts, columns = self.prompts.take([i for i in indices for _ in range(s.group_size)])
        chat = [self.prompts.chat[i] for i in indices for _ in range(s.group_size)]
        completions = [[{"role": "assistant", "content": t}] if c else t for t, c in zip(texts, chat)]
        scores = self.rewards.score(prompts, completions, columns)
        full = torch.cat([attn, torch.arange(completion.shape[1], device=d.device)[None] < first[:, None]], 1).long()
        learned = torch.zeros_like(full)
        learned[:, width:] = full[:, width:]
        return Sample(ids=out, attention=full, learned=learned, prompt_width=width, lengths=lengths, scores=scores,
                      texts=texts, generation_seconds=gen_seconds)

    @torch.no_grad()
    def logps(self, model: torch.nn.Module, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """Per token log-probabilities of ``ids`` under ``model``, in micro-batches, with no gradient."""
        micro = self.config.training.micro_batch_sequences
        was = model.training
        model.eval()
        parts = []
        for k in range(0, len(ids), micro):
            with self.autocast:
                parts.append(token_logps(model, ids[k:k + micro], attention[k:k + micro], self.settings.temperature)[0])
        model.train(was)
        return torch.cat(parts)


class Sample:
    """One rank's sampled completions: the full sequences (left-padded prompt, completion, padding) and masks."""

    def __init__(self, ids, attention, learned, prompt_width, lengths, scores: Scores, texts, generation_seconds):
        self.ids, self.attention, self.learned = ids, attention, learned
        self.prompt_width, self.lengths, self.scores, self.texts = prompt_width, lengths, scores, texts
        self.generation_seconds = generation_seconds


def token_logps(model, ids: torch.Tensor, attention: torch.Tensor, temperature: float = 1.0):
    """(log-probabilities [rows, len - 1] of each token given those before it, the model's output); the
    logits are divided by the sampling temperature, as the completions were sampled (as TRL does)."""
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=False)
    # the last position predicts nothing: a dummy target keeps the logits whole (a slice would be copied)
    targets = torch.cat([ids[:, 1:], ids[:, :1]], 1)
    return token_logprobs(out.logits, targets, temperature)[:, :-1], out


def frozen_copy(model: torch.nn.Module, d: Dist) -> torch.nn.Module:
    """The starting weights as a plain model of their own, whole on every rank (a collective under FSDP),
    for the reference's log-probabilities."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoModelForCausalLM

    from ..runtime.export import plain_tensors

    state = plain_tensors(get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                               cpu_offload=False)))
    ref = AutoModelForCausalLM.from_config(model.config)
    ref.load_state_dict({k: v.detach().clone() for k, v in state.items()})
    ref.to(device=d.device, dtype=next(model.parameters()).dtype)
    ref.eval().requires_grad_(False)
    return ref


class Figures:
    """The method's figures, summed on each rank since the last report and combined over ranks there."""

    def __init__(self, rewards: list[str]):
        self.rewards = rewards
        self.keys = (["reward", "reward_sq", "completions"]
                     + [f"{n}_{x}" for n in rewards for x in ("sum", "sq", "count")]
                     + ["completion_tokens", "zero_std_groups", "groups", "generation_seconds",
                        "training_tokens", "training_seconds", "kl", "clipped", "learned_tokens"])
        self.sums = dict.fromkeys(self.keys, 0.0)

    def add_sample(self, sample: Sample, group_size: int) -> None:
        total = np.array(sample.scores.total)
        s = self.sums
        s["reward"] += total.sum()
        s["reward_sq"] += (total ** 2).sum()
        s["completions"] += len(total)
        for name, values in sample.scores.by_function.items():
            v = np.array([x for x in values if x is not None])
            s[f"{name}_sum"] += v.sum()
            s[f"{name}_sq"] += (v ** 2).sum()
            s[f"{name}_count"] += len(v)
        s["completion_tokens"] += sum(sample.lengths)
        groups = total.reshape(-1, group_size)
        s["zero_std_groups"] += int((groups.max(1) == groups.min(1)).sum())
        s["groups"] += len(groups)
        s["generation_seconds"] += sample.generation_seconds

    def add(self, **values: float) -> None:
        for k, v in values.items():
            self.sums[k] += v

    def report(self, d: Dist) -> dict[str, float]:
        """The figures over every rank (a collective), by name; empty when nothing was sampled."""
        totals = dict(zip(self.keys, d.sum([float(self.sums[k]) for k in self.keys])))
        self.sums = dict.fromkeys(self.keys, 0.0)
        out: dict[str, float] = {}
        n = totals["completions"]
        if n:
            out["reward_mean"], out["reward_std"] = _mean_std(totals["reward"], totals["reward_sq"], n)
            for name in self.rewards:
                c = totals[f"{name}_count"]
                if c:
                    out[f"reward_{name}_mean"], out[f"reward_{name}_std"] = _mean_std(
                        totals[f"{name}_sum"], totals[f"{name}_sq"], c)
            out["completion_length"] = totals["completion_tokens"] / n
            out["zero_std_fraction"] = totals["zero_std_groups"] / totals["groups"]
            if totals["generation_seconds"]:
                out["generation_tokens_per_second"] = totals["completion_tokens"] / (totals["generation_seconds"] / d.world)
        if totals["training_seconds"]:
            out["training_tokens_per_second"] = totals["training_tokens"] / (totals["training_seconds"] / d.world)
        if totals["learned_tokens"]:
            out["kl"] = totals["kl"] / totals["learned_tokens"]
            out["clip_fraction"] = totals["clipped"] / totals["learned_tokens"]
        return out


def _mean_std(s: float, sq: float, n: float) -> tuple[float, float]:
    mean = s / n
    return mean, math.sqrt(max(sq / n - mean * mean, 0.0))


class SampledBatches:
    """Each step's rows: a new sample every ``updates`` steps, made into rows by the method (``rows``).
    State: prompts drawn, samples taken, steps on the current one (a resume in the middle of a sample's
    updates samples anew)."""

    def __init__(self, rollouts: Rollouts, rows, prompts_per_step, updates: int = 1):
        self.rollouts, self.rows, self.prompts_per_step, self.updates = rollouts, rows, prompts_per_step, updates
        self.drawn = self.generations = self.uses = 0
        self.current: torch.Tensor | None = None
        self._returned: float | None = None

    def next_step(self, global_batch: int, rank: int, world: int) -> torch.Tensor:
        r = self.rollouts
        if self._returned is not None and self.current is not None:
            r.figures.add(training_seconds=time.monotonic() - self._returned,
                          training_tokens=float(self.current[:, 1].sum()))
        if self.current is None or self.uses >= self.updates:
            per_step = self.prompts_per_step(global_batch)
            share = per_step // world
            mine = [r.order(k) for k in range(self.drawn + rank * share, self.drawn + (rank + 1) * share)]
            sample = r.sample(mine, self.generations)
            r.figures.add_sample(sample, r.settings.group_size)
            self.current = self.rows(sample)
            self.drawn += per_step
            self.generations += 1
            self.uses = 0
        self.uses += 1
        self._returned = time.monotonic()
        return self.current

    def state_dict(self) -> dict:
        return {"prompts_drawn": self.drawn, "generations": self.generations, "uses": self.uses}

    def load_state_dict(self, state: dict) -> None:
        self.drawn, self.generations = state.get("prompts_drawn", 0), state.get("generations", 0)
        self.uses, self.current = state.get("uses", 0), None
