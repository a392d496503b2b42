"""On the real weights: SmolLM2 3 -> 1 KV heads per strategy, and MiniLM (real MHA) 12 -> 4."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from hf_attn_swap import kv_heads_per_layer, swap_attention
from hf_attn_swap.data import load_text, token_blocks, tokenize
from hf_attn_swap.eval.embeddings import embedding_fidelity, sentence_embeddings, sentences_of
from hf_attn_swap.eval.perplexity import perplexity

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def held_out(smollm2):
    _, tok = smollm2
    ids = tokenize(tok, load_text("shakespeare", split="validation"), max_tokens=1024)
    calib = token_blocks(tok, load_text("shakespeare", split="train"), 512, max_tokens=2048)
    return ids, calib


def test_smollm2_to_mqa_each_strategy_runs_and_fit_beats_mean(smollm2, held_out):
    model, _ = smollm2
    ids, calib = held_out
    base = perplexity(model, ids, context=512).token_ppl
    ppl = {}
    for strategy in ("mean", "first", "random", "fit"):
        m = copy.deepcopy(model)
        swap_attention(m, "mqa", strategy=strategy, calibration=calib)
        assert kv_heads_per_layer(m) == [1] * 30
        ppl[strategy] = perplexity(m, ids, context=512).token_ppl
        assert math.isfinite(ppl[strategy]) and ppl[strategy] > base, (strategy, ppl, base)
    # Without training, mean-pooling MQA is catastrophic on SmolLM2 (the notes measured ~9000); the calibrated fit
    # must close most of the log gap to the original.
    assert ppl["mean"] > 20 * base
    assert math.log(ppl["fit"] / base) < 0.5 * math.log(ppl["mean"] / base), ppl


def test_smollm2_mha_round_trip_is_exact(smollm2, held_out):
    """Expanding 3 KV heads to 9 (duplicates) and mean-pooling back loses nothing (the notes' check)."""
    from hf_attn_swap.convert.adapters import get_adapter
    from hf_attn_swap.convert.projections import build_new_modules, commit, find_attention, read_projections

    model, _ = smollm2
    ids = held_out[0][:256][None]
    m = copy.deepcopy(model)
    with torch.no_grad():
        ref = m(ids).logits
        adapter = get_adapter(m)
        blocks = []
        for site in find_attention(m, adapter):
            p = read_projections(site.module, site.parent, adapter, head_dim=site.head_dim)
            rep = lambda w: w.reshape(3, 1, 64, -1).expand(3, 3, 64, w.shape[-1]).reshape(9 * 64, -1)  # noqa: E731
            blocks.append(build_new_modules(site, adapter, p.replace(k_w=rep(p.k_w), v_w=rep(p.v_w))))
        commit(blocks)
        m.config.num_key_value_heads = 9
        assert kv_heads_per_layer(m) == [9] * 30
        torch.testing.assert_close(m(ids).logits, ref, atol=1e-4, rtol=1e-4)  # fp32, 30 layers
        swap_attention(m, "gqa", groups=3, strategy="mean")
        torch.testing.assert_close(m(ids).logits, ref, atol=1e-4, rtol=1e-4)


def test_minilm_12_to_4_fit_keeps_embeddings_closer_than_mean(minilm):
    model, tok = minilm
    held = sentences_of(load_text("shakespeare", split="validation"), limit=64)
    train = sentences_of(load_text("shakespeare", split="train"), limit=128)
    calib = [dict(tok(train[i : i + 32], padding=True, truncation=True, return_tensors="pt")) for i in range(0, 128, 32)]
    ref = sentence_embeddings(model, tok, held)
    cos = {}
    for strategy in ("mean", "fit"):
        m = copy.deepcopy(model)
        swap_attention(m, "gqa", groups=4, strategy=strategy, calibration=calib)
        assert kv_heads_per_layer(m) == [4] * 6
        cos[strategy] = embedding_fidelity(ref, sentence_embeddings(m, tok, held))
    assert cos["fit"] > cos["mean"], cos
    assert cos["fit"] > 0.8, cos
