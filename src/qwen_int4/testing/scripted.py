"""A real QWenLMHeadModel whose greedy output is scripted: for tests that need exact replies.

The "bigram" construction (as tests/test_chat_api.py): attention and MLP outputs are
zeroed, so the hidden state, and the logits, depend on the current token only; token
t_i gets a one-hot embedding e_i and lm_head maps e_i to a large logit for t_{i+1}.
A chain [trigger, t1, ..., tn] makes the model answer t1..tn after a prompt ending with
`trigger`. Every token may have one successor only, so a text with repeated tokens is
written with distinct ones (`distinct_token_ids`): the decoded text is the same.
"""
from __future__ import annotations

import itertools
from collections.abc import Collection, Sequence

import torch

from ..config import GenerationConfig, QwenConfig
from ..model.qwen import QWenLMHeadModel
from ..tokenizer import QWenTokenizer


def distinct_token_ids(tokenizer: QWenTokenizer, text: str, avoid: Collection[int] = ()) -> list[int]:
    """Token ids that decode to `text`, all different and none in `avoid` (longest pieces first)."""
    data, ranks = text.encode("utf-8"), tokenizer.mergeable_ranks

    def search(i: int, used: frozenset[int]) -> list[int] | None:
        if i == len(data):
            return []
        for size in range(min(16, len(data) - i), 0, -1):
            token = ranks.get(data[i:i + size])
            if token is None or token in used:
                continue
            rest = search(i + size, used | {token})
            if rest is not None:
                return [token, *rest]
        return None

    ids = search(0, frozenset(avoid))
    if ids is None:
        raise ValueError(f"{text!r} cannot be written with distinct tokens avoiding {sorted(avoid)}")
    return ids


def bigram_model(chains: Sequence[Sequence[int]], hidden: int = 64, seed: int = 3) -> QWenLMHeadModel:
    """A float32 model that continues each chain's trigger (its first id) with the rest of the chain."""
    successor: dict[int, int] = {}
    for chain in chains:
        for token, nxt in itertools.pairwise(chain):
            if successor.setdefault(token, nxt) != nxt:
                raise ValueError(f"token {token} is followed by both {successor[token]} and {nxt}")
    if len(successor) > hidden:
        raise ValueError(f"{len(successor)} transitions need hidden >= {len(successor)}, got {hidden}")
    cfg = QwenConfig(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4, kv_channels=hidden // 4,
                     intermediate_size=4 * hidden, seq_length=8192)
    model = QWenLMHeadModel(cfg, GenerationConfig(do_sample=False))
    model.init_weights(seed)
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.zero_()
        model.lm_head.weight[list(set(successor.values()))] = 0.0
        for i, (token, nxt) in enumerate(successor.items()):
            model.transformer.wte.weight[token] = torch.nn.functional.one_hot(torch.tensor(i), hidden).float()
            model.lm_head.weight[nxt, i] = 100.0  # ln_f(one-hot) = sqrt(hidden) * one-hot: a logit of ~800
    return model.eval()
