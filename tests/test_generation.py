"""Greedy generation for the Compare tab: plain or through the chat template, and where two models diverge."""

import pytest
import torch

from moe_core.generation import Generation, generate, prompt_ids, shared_prefix
from moe_core.model_io import tiny_model


def test_plain_generation_is_greedy_and_reports_its_tokens():
    dense = tiny_model("llama")
    a, b = generate(dense, "Hello", 5), generate(dense, "Hello", 5)
    assert a.token_ids == b.token_ids and len(a.token_ids) == a.new_tokens == 5
    assert not a.chat and shared_prefix(a, b) == 5


def test_chat_is_ignored_without_a_template():
    dense = tiny_model("llama")  # the byte tokenizer has no chat template
    assert generate(dense, "Hello", 2, chat=True).chat is False


def test_shared_prefix_stops_at_the_first_difference():
    g = lambda ids: Generation("", 1, len(ids), 1.0, 1.0, tuple(ids))  # noqa: E731
    assert shared_prefix(g([1, 2, 3]), g([1, 2, 4])) == 2
    assert shared_prefix(g([5]), g([6, 7])) == 0 and shared_prefix(g([1, 2]), g([1, 2, 3])) == 2


@pytest.mark.slow
def test_chat_template_wraps_the_prompt_as_a_user_turn(smollm2):
    tok = smollm2.tokenizer
    plain, chat = prompt_ids(tok, "What is 2 + 2?", False), prompt_ids(tok, "What is 2 + 2?", True)
    assert isinstance(chat, torch.Tensor) and chat.shape[0] == 1 and chat.shape[1] > plain.shape[1]
    text = tok.decode(chat[0])
    assert "user" in text and "What is 2 + 2?" in text and text.rstrip().endswith("assistant")
    g = generate(smollm2, "What is 2 + 2?", 4, chat=True)
    assert g.chat and g.prompt_tokens == chat.shape[1]
