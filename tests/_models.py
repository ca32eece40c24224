"""Shared by the model tests: tiny models with weights that make mistakes visible."""
import torch

from qwen_int4.config import QwenConfig
from qwen_int4.model.qwen import QWenLMHeadModel


def random_tiny_model(config: QwenConfig, seed: int = 0, norm_std: float = 0.0) -> QWenLMHeadModel:
    """Reference init, then random c_attn biases (and norm weights 1 + N(0, norm_std)) and the
    other weights x5, so a misplaced bias or norm shows up and attention is sharp."""
    model = QWenLMHeadModel(config)
    model.init_weights(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("c_attn.bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            elif name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                if norm_std:
                    p.copy_(1.0 + torch.randn(p.shape, generator=gen) * norm_std)
            else:
                p.mul_(5.0)  # larger than the training init: sharper attention, more distinct logits
    return model.eval()


def random_prompts(lengths, seed: int, vocab: int = 151000) -> list[list[int]]:
    """One random prompt (token id list) per length, reproducible from `seed`."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
