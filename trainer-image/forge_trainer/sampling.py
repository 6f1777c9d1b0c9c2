"""Generate text from an exported model directory (offline)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def sample(output_dir: str, prompt: str, max_new_tokens: int = 64, top_k: int | None = None, temperature: float = 1.0,
           seed: int = 0, repetition_penalty: float = 1.2) -> str:
    """The completion of `prompt` (without the prompt): greedy, or top-k sampling when top_k is set.

    The repetition penalty (CTRL's, as in transformers) keeps a small model's greedy completion
    from looping on one phrase; 1.0 turns it off."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(output_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(output_dir, local_files_only=True)
    model.eval()
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    torch.manual_seed(seed)
    kwargs = {"do_sample": True, "top_k": top_k, "temperature": temperature} if top_k else {"do_sample": False}
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             repetition_penalty=repetition_penalty, **kwargs)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
