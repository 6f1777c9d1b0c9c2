"""Mixture-of-experts models: Qwen3-MoE (Qwen3MoeForCausalLM), trained with the router's
load-balancing loss (`output_router_logits`)."""

from __future__ import annotations

from transformers import Qwen3MoeConfig

from ..config import ArchitectureConfig


def hf_config(a: ArchitectureConfig, **common) -> Qwen3MoeConfig:
    return Qwen3MoeConfig(
        intermediate_size=a.intermediate_size,
        num_experts=a.num_experts,
        num_experts_per_tok=a.num_experts_per_token,
        moe_intermediate_size=a.moe_intermediate_size,
        norm_topk_prob=True,
        output_router_logits=True,
        router_aux_loss_coef=a.router_aux_loss_coef,
        **common,
    )
