"""`qwen-int4 serve --model DIR`: an OpenAI-compatible HTTP server (continuous batching, paged KV cache)."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..engine.paged_cache import KV_CACHE_DTYPES
from .common import add_model_args, demo_checkpoint


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="model id(s) clients ask for (default: the checkpoint directory's name)")
    kv = p.add_mutually_exclusive_group()
    kv.add_argument("--gpu-memory-utilization", type=float, default=None,
                    help="CUDA: fraction of the card's memory for weights + activations + KV cache (default 0.9)")
    kv.add_argument("--kv-cache-gb", type=float, default=None, help="KV cache size in GiB (CPU default: 1)")
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                   help="KV cache storage: auto = the model's dtype; int8 = uint8 with a scale and zero per token "
                        "and head (~1.9x the blocks in the same memory, half the bytes read per decode step; "
                        "default auto)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block (default 16)")
    p.add_argument("--max-num-seqs", type=int, default=128, help="most sequences in a batch (default 128)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="most tokens in one step; longer prompts are prefilled in chunks (default 2048)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="longest prompt + reply (default: config.json max_position_embeddings)")
    p.add_argument("--no-prefix-caching", action="store_true", help="do not share KV blocks of equal prefixes")
    p.add_argument("--log-level", default="info", help="uvicorn log level (default info)")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from ..engine import EngineConfig
    from ..server import create_app

    path = demo_checkpoint() if args.demo else args.model
    names = args.served_model_name or [Path(str(path)).name]
    config = EngineConfig(
        block_size=args.block_size, kv_cache_gb=args.kv_cache_gb, gpu_memory_utilization=args.gpu_memory_utilization,
        kv_cache_dtype=args.kv_cache_dtype,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len, enable_prefix_caching=not args.no_prefix_caching,
    )

    def load():
        from ..loader import AutoModelForCausalLM
        from ..tokenizer import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, device_map=args.device, torch_dtype=args.dtype,
                                                     progress=False).eval()
        return model, tokenizer

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(load, names, config), host=args.host, port=args.port, log_level=args.log_level)
    return 0
