"""Time and memory of GPTQ on Qwen-7B-shaped blocks: quantize_model on a random-weight model
with the 7B shapes but only --layers blocks, calibrated on --samples x --seq-len random tokens
(the quantizer's cost does not depend on the token values). Prints the measured seconds per
block, the GPU's peak memory and the extrapolation to the 32 blocks of Qwen-7B.

    PYTHONPATH=src python benchmarks/quant_speed.py --layers 2 --samples 128 --seq-len 2048
"""
from __future__ import annotations

import argparse
import resource
import time

import torch

from qwen_int4.config import QwenConfig
from qwen_int4.model.qwen import QWenLMHeadModel
from qwen_int4.quant.quantizer import GPTQSettings, block_inputs, quantize_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--desc-act", action="store_true")
    p.add_argument("--device", default="cuda")
    p.add_argument("--hidden", type=int, default=4096, help="smaller shapes for a smoke test (heads = hidden / 128)")
    p.add_argument("--intermediate", type=int, default=22016)
    args = p.parse_args()
    device = torch.device(args.device)

    config = QwenConfig(num_hidden_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.hidden // 128,
                        intermediate_size=args.intermediate)  # the 7B defaults otherwise
    with torch.device("meta"):
        model = QWenLMHeadModel(config)
    model.to_empty(device="cpu")
    model.to(torch.bfloat16)  # as the BF16 release is loaded on the CPU
    model.init_weights(seed=0)
    gen = torch.Generator().manual_seed(0)
    samples = [torch.randint(0, 151851, (args.seq_len,), generator=gen).tolist() for _ in range(args.samples)]
    settings = GPTQSettings(bits=args.bits, group_size=128, desc_act=args.desc_act)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"

    start = time.perf_counter()
    states = block_inputs(model, samples, device)  # what quantize_model does first
    if device.type == "cuda":
        torch.cuda.synchronize()
    t_inputs = time.perf_counter() - start
    del states
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    quantize_model(model, samples, settings, device, progress=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    total = time.perf_counter() - start
    per_block = (total - t_inputs) / args.layers
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"card: {card}; {args.layers} blocks of hidden {args.hidden}, MLP {args.intermediate // 2}, {args.samples} x {args.seq_len} calibration tokens, "
          f"{args.bits}-bit g128 desc_act={args.desc_act}")
    print(f"measured: block inputs (embedding) {t_inputs:.1f} s; quantize_model {total:.1f} s "
          f"=> {per_block:.1f} s per block; GPU peak {peak:.1f} GiB; host peak RSS {rss:.1f} GiB")
    print(f"extrapolated to 32 blocks: {t_inputs + 32 * per_block:.0f} s ({(t_inputs + 32 * per_block) / 60:.1f} min), "
          f"GPU peak unchanged (one block at a time)")


if __name__ == "__main__":
    main()
