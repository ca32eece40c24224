"""GPTQ vs round-to-nearest: output error on held-out activations, and logits against the source.

Part "tiny": a small random-weight BF16 Qwen checkpoint is quantized end to end with
`quantize_checkpoint` (built-in calibration set), GPTQ and RTN at the same bits and group
size. Reported per layer kind: ||X W^T - X Ŵ^T|| / ||X W^T|| on held-out prompts' inputs to
that layer in the source model; and for the whole model the relative logit error and top-1
agreement against the source. Run twice: plain random weights (near-white activations,
H ~ I) and with a correlated embedding (decaying spectrum + outlier channels, as real LLMs).

Part "layers": single layers with the real 7B shapes and synthetic correlated inputs
(`correlated_activations`): H from calibration tokens, error on held-out tokens.

    PYTHONPATH=src python benchmarks/quant_quality.py --part tiny
    PYTHONPATH=src python benchmarks/quant_quality.py --part layers --device cuda
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from qwen_int4.loader import load_model
from qwen_int4.quant.calibration import correlated_activations
from qwen_int4.quant.quantizer import GPTQSettings, gptq_quantize_weight, quantize_checkpoint, rtn_quantize_weight
from qwen_int4.testing import make_test_checkpoint, read_checkpoint_tensors
from qwen_int4.tokenizer import QWenTokenizer

HELD_OUT = [  # not in the built-in calibration set
    "The history of the printing press begins in the fifteenth century with Johannes Gutenberg in Mainz.",
    "def merge_sort(xs):\n    if len(xs) <= 1:\n        return xs\n    mid = len(xs) // 2\n",
    "我们明天上午九点在图书馆门口集合，请大家带好学生证和笔记本。",
    "<|im_start|>user\nHow many legs does a spider have?<|im_end|>\n<|im_start|>assistant\nA spider has eight legs.",
    "Let a_n = 2a_{n-1} + 1 with a_0 = 0. Then a_n = 2^n - 1, which we prove by induction on n.",
    "SELECT name FROM employees WHERE salary > (SELECT AVG(salary) FROM employees);",
    "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。",
    "Please find attached the quarterly report; the main changes are in sections 2 and 4.",
]
LAYER_SHAPES = {  # name: (in_features K, out_features N) of Qwen-7B
    "attn.c_proj 4096->4096": (4096, 4096),
    "mlp.w1 4096->11008": (4096, 11008),
    "mlp.c_proj 11008->4096": (11008, 4096),
}


def rel_error(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    ref = x @ w.t()
    return ((ref - x @ w_hat.t()).norm() / ref.norm()).item()


# ---------------------------------------------------------------- part "tiny"


def tiny_checkpoint(path: Path, correlated: bool, seed: int = 0) -> Path:
    path = make_test_checkpoint(path, layers=4, hidden=256, heads=4, intermediate=1536, seed=seed)
    if correlated:
        tensors = read_checkpoint_tensors(path)
        emb = correlated_activations(tensors["transformer.wte.weight"].shape[0], 256, seed=seed)
        tensors["transformer.wte.weight"] = (emb * 0.02 / emb.std()).bfloat16()
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


def held_out_inputs(model, prompts) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Inputs [T, K] of every block linear on the held-out prompts, and the logits [T, vocab]."""
    inputs: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".h." in name:
            hooks.append(module.register_forward_pre_hook(
                lambda m, args, name=name: inputs.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1]))))
    with torch.no_grad():
        logits = torch.cat([model(ids, use_cache=False).logits[0] for ids in prompts])
    for h in hooks:
        h.remove()
    return {k: torch.cat(v) for k, v in inputs.items()}, logits


def run_tiny(correlated: bool, bits_list=(4, 8), group_size: int = 128) -> None:
    tok = QWenTokenizer()
    prompts = [torch.tensor([tok.encode(t)]) for t in HELD_OUT]
    with tempfile.TemporaryDirectory() as tmp:
        src = tiny_checkpoint(Path(tmp) / "src", correlated)
        source = load_model(src, torch_dtype=torch.float32, progress=False)
        xs, ref_logits = held_out_inputs(source, prompts)
        weights = {n: m.weight for n, m in source.named_modules() if n in xs}
        print(f"\n### tiny model (4 layers, hidden 256, MLP 768, group {group_size}), "
              f"{'correlated embedding' if correlated else 'plain random weights'}; {ref_logits.shape[0]} held-out tokens")
        print("| config | c_attn | attn.c_proj | mlp.w1 | mlp.w2 | mlp.c_proj | logit rel. error | top-1 agreement |")
        print("|---|---|---|---|---|---|---|---|")
        for bits in bits_list:
            for method, desc_act in (("rtn", False), ("gptq", False), ("gptq", True)):
                settings = GPTQSettings(bits=bits, group_size=group_size, desc_act=desc_act, method=method)
                out = quantize_checkpoint(src, Path(tmp) / f"{method}{bits}{desc_act}", settings, progress=False)
                model = load_model(out, torch_dtype=torch.float32, progress=False)
                per_kind = {}
                for name, x in xs.items():
                    w_hat = model.get_submodule(name).dequantized_weight(torch.float32).t()
                    kind = name.split(".", 3)[3]
                    per_kind.setdefault(kind, []).append(rel_error(weights[name], w_hat, x))
                with torch.no_grad():
                    logits = torch.cat([model(ids, use_cache=False).logits[0] for ids in prompts])
                err = ((logits - ref_logits).norm() / ref_logits.norm()).item()
                top1 = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
                cells = " | ".join(f"{sum(v) / len(v):.4f}" for v in per_kind.values())
                label = f"{bits}-bit {method.upper()}{' desc_act' if desc_act else ''}"
                print(f"| {label} | {cells} | {err:.4f} | {top1:.3f} |")


# ---------------------------------------------------------------- part "layers"


def run_layers(device: str, calib_tokens: int, eval_tokens: int, group_size: int = 128) -> None:
    print(f"\n### single layers, 7B shapes, correlated synthetic inputs; device {device}, "
          f"{calib_tokens} calibration / {eval_tokens} held-out tokens, group {group_size}")
    print("| layer | bits | RTN error | GPTQ error | GPTQ/RTN | GPTQ desc_act error | desc_act/RTN | GPTQ time |")
    print("|---|---|---|---|---|---|---|---|")
    for label, (k_in, n_out) in LAYER_SHAPES.items():
        seed = k_in + n_out
        x_eval = correlated_activations(eval_tokens, k_in, seed=seed, sample_seed=1).to(device)
        h = torch.zeros(k_in, k_in, device=device)
        for start in range(0, calib_tokens, 4096):  # accumulate H = 2 X^T X / T in chunks
            x = correlated_activations(min(4096, calib_tokens - start), k_in, seed=seed, sample_seed=1000 + start).to(device)
            h.addmm_(x.t(), x)
        h.mul_(2.0 / calib_tokens)
        w = (0.02 * torch.randn(n_out, k_in, generator=torch.Generator().manual_seed(seed))).to(device)
        for bits in (4, 8):
            rtn = rel_error(w, rtn_quantize_weight(w, bits, group_size)["weight"], x_eval)
            start = time.perf_counter()
            gptq = rel_error(w, gptq_quantize_weight(w, h, bits, group_size)["weight"], x_eval)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            act = rel_error(w, gptq_quantize_weight(w, h, bits, group_size, desc_act=True)["weight"], x_eval)
            print(f"| {label} | {bits} | {rtn:.5f} | {gptq:.5f} | {gptq / rtn:.3f} | {act:.5f} | {act / rtn:.3f} | {seconds:.1f} s |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("tiny", "layers", "all"), default="all")
    p.add_argument("--device", default="cpu", help="device for part 'layers' (cpu or cuda)")
    p.add_argument("--calib-tokens", type=int, default=16384, help="calibration tokens per layer (part 'layers')")
    p.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens per layer (part 'layers')")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if torch.cuda.is_available():
        print(f"card: {torch.cuda.get_device_name()}")
    if args.part in ("tiny", "all"):
        for correlated in (False, True):
            run_tiny(correlated)
    if args.part in ("layers", "all"):
        run_layers(args.device, args.calib_tokens, args.eval_tokens)


if __name__ == "__main__":
    main()
