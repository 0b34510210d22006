"""Greedy generation with a timing, to put a dense model and its MoE conversion side by side on one prompt."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Generation:
    text: str  # the continuation only (prompt excluded)
    prompt_tokens: int
    new_tokens: int
    seconds: float  # wall time of the generate call (prefill + decode)
    tokens_per_s: float  # new tokens / seconds
    token_ids: tuple[int, ...] = ()  # the new tokens
    chat: bool = False  # the prompt went through the tokenizer's chat template

    def as_dict(self) -> dict:
        return asdict(self)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_ids(tokenizer, prompt: str, chat: bool):
    """(1, T) ids of ``prompt``: as one user turn of the chat template when asked and the tokenizer has one."""
    if chat and has_chat_template(tokenizer):
        out = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt"
        )
        return out["input_ids"] if hasattr(out, "keys") else out  # a BatchEncoding in transformers 5
    return tokenizer(prompt, return_tensors="pt").input_ids


@torch.no_grad()
def generate(dense, prompt: str, max_new_tokens: int = 32, chat: bool = False) -> Generation:
    """Greedy continuation of ``prompt`` (deterministic, so that two models can be compared token by token).

    ``chat``: wrap the prompt in the tokenizer's chat template (instruct models); ignored without one.
    """
    if not str(prompt).strip():
        raise ValueError("The prompt is empty: type some text to continue.")
    if not 1 <= int(max_new_tokens) <= 4096:
        raise ValueError(f"max_new_tokens must be 1..4096, got {max_new_tokens}.")
    chat = bool(chat) and has_chat_template(dense.tokenizer)
    ids = prompt_ids(dense.tokenizer, prompt, chat).to(dense.device)  # (1, T)
    pad = dense.tokenizer.pad_token_id
    pad = pad if pad is not None else dense.tokenizer.eos_token_id
    start = time.perf_counter()
    out = dense.model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=int(max_new_tokens),
        do_sample=False,
        pad_token_id=pad,
    )  # (1, T + n)
    seconds = time.perf_counter() - start
    new = out[0, ids.shape[1] :]
    return Generation(
        text=dense.tokenizer.decode(new, skip_special_tokens=True),
        prompt_tokens=ids.shape[1],
        new_tokens=len(new),
        seconds=seconds,
        tokens_per_s=len(new) / seconds if seconds > 0 else 0.0,
        token_ids=tuple(new.tolist()),
        chat=chat,
    )


def shared_prefix(a: Generation, b: Generation) -> int:
    """How many leading new tokens two greedy generations have in common."""
    n = 0
    for x, y in zip(a.token_ids, b.token_ids, strict=False):
        if x != y:
            break
        n += 1
    return n
