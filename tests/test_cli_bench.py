"""`qwen-int4 bench`: its options parse, and without CUDA it stops with a clear message (code 2)."""
from __future__ import annotations

import pytest
import torch

from qwen_int4.cli import bench
from qwen_int4.cli.main import build_parser, main


def test_bench_parser_defaults_and_quick():
    args = build_parser().parse_args(["bench", "--quick", "--kv", "fp16,int8", "--tokens", "16,32"])
    assert args.run is bench.run
    assert args.quick and args.kv == ["fp16", "int8"] and args.tokens == [16, 32]
    assert args.precision == ["int4", "bf16", "int8"] and args.encode is None


@pytest.mark.parametrize("bad", [["--kv", "fp8"], ["--tokens", "0"], ["--tokens", "a,b"], ["--precision", "fp4"]])
def test_bench_parser_rejects_bad_values(bad, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["bench", *bad])
    assert exc.value.code == 2
    assert "expected" in capsys.readouterr().err


def test_bench_without_cuda_exits_2_with_a_clear_message(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "qwen-int4 bench: error: needs a CUDA GPU" in err


def test_bench_tables_print_the_measured_runs(capsys):
    decode = [{"tokens": n, "tok_s": 100.0 + n, "ms_per_token": 1.0, "mean_step_GB": 5.0, "achieved_GBps": 500.0,
               "roofline_tok_s": 400.0, "vs_roofline": 0.25, "peak_GB": 7.0 + n / 1000} for n in (16, 32)]
    results = {"info": {"device": "GPU"}, "copy_bandwidth_GBps": 2000.0,
               "runs": [{"precision": "int4", "kv_dtype": "fp16", "encode_peak_GB": 6.5, "decode": decode}]}
    bench.print_tables(results, [16, 32], 64)
    out = capsys.readouterr().out
    assert "| int4 | fp16 | 116.0 | 132.0 |" in out
    assert "| int4 | fp16 | 6.500 | 7.032 |" in out
    assert "| bf16 |" not in out and "| int8 |" not in out  # only what was measured (tests/test_bench_tables.py)
    assert "| int4 | fp16 | 32 | 1.000 | 5.000 | 500 | 400 | 25% |" in out
