import pytest
import torch

# Tiny models run many small ops: one thread avoids the thread-pool overhead that
# dominates them on a 2-core machine (a decode step of a tiny model: ~25 ms -> ~2 ms).
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tokenizer():
    from qwen_int4.tokenizer import QWenTokenizer

    return QWenTokenizer()


@pytest.fixture(scope="session")
def tiny_int4_dir(tmp_path_factory):
    """A tiny random-weight GPTQ Int4 checkpoint in the exact Hugging Face layout."""
    from qwen_int4.testing.checkpoint import make_test_checkpoint

    return make_test_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-int4", layers=2, hidden=64, heads=4,
                                bits=4, group_size=32, seed=0)


@pytest.fixture(scope="session")
def tiny_int4_model(tiny_int4_dir):
    """The tiny Int4 checkpoint loaded on the CPU in float32 (shared: tests must not modify it)."""
    from qwen_int4.loader import load_model

    return load_model(tiny_int4_dir, torch_dtype="float32", progress=False)
