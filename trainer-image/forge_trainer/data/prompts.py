"""Prompt sets: the records grpo and online-dpo sample completions for.

A record's prompt_field is text (used as written) or a conversation (rendered with the chat template up to
the generation prompt); its other fields are columns, passed to the reward functions. Every rank reads the
(small) prompt set itself; rank 0's digest decides, as for the other methods' data."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from ..config import TrainerConfig
from ..contract import DataError
from .records import ChatRenderer, _conversation
from .sources import data_digest, iter_records, read_bytes, source_label
from .tokenizer import TextTokenizer


@dataclass
class PromptSet:
    prompts: list = field(default_factory=list)
    """As the reward functions see them: text, or a list of {role, content} messages."""
    ids: list[list[int]] = field(default_factory=list)
    """Each prompt's tokens, as the policy continues them."""
    columns: dict[str, list] = field(default_factory=dict)
    """The records' other fields by name, one value per prompt (None where a record lacks it)."""
    chat: list[bool] = field(default_factory=list)
    digest: str = ""
    provenance: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)

    def take(self, indices: list[int]) -> tuple[list, dict[str, list]]:
        """The prompts and columns of these records."""
        return [self.prompts[i] for i in indices], {k: [v[i] for i in indices] for k, v in self.columns.items()}


def load_prompts(config: TrainerConfig, tokenizer: TextTokenizer, renderer: ChatRenderer | None) -> PromptSet:
    digest, listing = data_digest(config.data)
    out, records, sources = PromptSet(digest=digest), [], []
    max_prompt = config.training.seq_len - config.method.max_new_tokens
    for i, src in enumerate(config.data.sources):
        where = source_label(i, src)
        count = 0
        for f, sha in listing[src.name]:
            for at, record in iter_records(src, f, read_bytes(f, where), where):
                here = f"{where}: {f.rel} {at}"
                prompt = record.get(src.prompt_field)
                if isinstance(prompt, str):
                    if not prompt:
                        raise DataError(f"{here}: {src.prompt_field!r} is empty")
                    out.chat.append(False)
                    text, ids = prompt, tokenizer.encode_batch([prompt])[0]
                elif isinstance(prompt, list):
                    if renderer is None:
                        raise DataError(f"{here}: a conversation prompt needs a chat template")
                    prompt = _conversation(record | {src.prompt_field: [*prompt, {"role": "assistant", "content": ""}]},
                                           src.prompt_field, here)[:-1]
                    text = renderer.render(prompt, True)
                    ids = renderer.specials.encode(text, add_special_tokens=False).ids
                    out.chat.append(True)
                else:
                    raise DataError(f"{here}: no string or list field {src.prompt_field!r} (a prompt: text, or a "
                                    "conversation [{role, content}, ...])")
                if len(ids) > max_prompt:
                    raise DataError(f"{here}: the prompt is {len(ids)} tokens; with method.max_new_tokens "
                                    f"{config.method.max_new_tokens} it does not fit in training.seq_len "
                                    f"{config.training.seq_len}")
                out.prompts.append(prompt)
                out.ids.append(ids)
                records.append({k: v for k, v in record.items() if k != src.prompt_field})
                count += 1
        sources.append({"name": src.name, "path": str(src.path), "format": src.format, "records": "prompt",
                        "prompts": count, "files": [{"path": str(f.path), "sha256": sha} for f, sha in listing[src.name]]})
    if not out.prompts:
        raise DataError("data.sources: the prompt set is empty (no records with a prompt)")
    names = sorted({k for r in records for k in r})
    out.columns = {k: [r.get(k) for r in records] for k in names}
    out.provenance = {"digest": digest, "prompts": len(out), "columns": names, "sources": sources,
                      "prompt_tokens_digest": hashlib.sha256(json.dumps(out.ids).encode()).hexdigest()}
    return out
