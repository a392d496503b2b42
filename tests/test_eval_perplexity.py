"""Strided perplexity: matches a direct NLL computation, scores every token once, explicit normalisations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from hf_attn_swap.eval.perplexity import perplexity, windows


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def _ids(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(seed))


def _direct_nll(model, ids: torch.Tensor, context: int, stride: int) -> tuple[float, int]:
    """Reference for stride < context: the transformers documentation's loop (one window at a time, -100 labels),
    except that the last, shorter window is extended backwards to ``context`` tokens (more context, same targets)."""
    total, count, prev_end = 0.0, 0, 1
    for begin in range(0, ids.numel(), stride):
        end = min(begin + context, ids.numel())
        n_new = end - prev_end
        if n_new > 0:
            x = ids[max(0, end - context) : end][None]
            with torch.no_grad():
                logits = model(x).logits[0]
            labels = x[0].clone()
            labels[: labels.numel() - n_new] = -100
            total += float(F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum"))
            count += n_new
            prev_end = end
        if end == ids.numel():
            break
    return total, count


def test_single_window_equals_mean_nll(tiny):
    ids = _ids(100)
    with torch.no_grad():
        logits = tiny(ids[None]).logits[0]
    direct = F.cross_entropy(logits[:-1], ids[1:], reduction="mean").item()
    r = perplexity(tiny, ids, context=128)
    assert r.n_tokens == 99
    assert r.mean_nll == pytest.approx(direct, rel=1e-5)  # fp32: same ops, different reduction order
    assert r.token_ppl == pytest.approx(math.exp(direct), rel=1e-5)


@pytest.mark.parametrize("context,stride,batch", [(32, 8, 3), (50, 17, 1), (16, 5, 8)], ids=["stride8", "odd", "stride5"])
def test_strided_matches_reference(tiny, context, stride, batch):
    ids = _ids(121)
    ref_nll, ref_n = _direct_nll(tiny, ids, context, stride)
    r = perplexity(tiny, ids, context=context, stride=stride, batch_size=batch)
    assert r.n_tokens == ref_n == 120
    assert r.nll_sum == pytest.approx(ref_nll, rel=1e-5)  # fp32 tolerance


def test_disjoint_windows_match_direct_computation(tiny):
    """stride == context: each window predicts its tokens from what precedes them inside it; computed by hand."""
    ids = _ids(121)
    total = 0.0
    for begin, end, k in [(0, 32, 31), (31, 63, 31), (62, 94, 31), (89, 121, 27)]:
        with torch.no_grad():
            logits = tiny(ids[begin:end][None]).logits[0]
        total += float(F.cross_entropy(logits[-k - 1 : -1], ids[end - k : end], reduction="sum"))
    assert windows(121, 32, 32) == [(0, 32, 31), (31, 63, 31), (62, 94, 31), (89, 121, 27)]
    r = perplexity(tiny, ids, context=32, batch_size=4)
    assert r.n_tokens == 120 and r.stride == 31
    assert r.nll_sum == pytest.approx(total, rel=1e-5)  # fp32


@pytest.mark.parametrize("n,context,stride", [(2, 2, 1), (7, 4, 3), (64, 64, 64), (65, 64, 1), (1000, 100, 37), (10, 32, 5)])
def test_every_token_after_the_first_scored_exactly_once(n, context, stride):
    scored = []
    for begin, end, k in windows(n, context, stride):
        assert 0 < k <= end - begin - (1 if begin == 0 else 0)
        assert end - begin <= context
        scored += range(end - k, end)
    assert scored == list(range(1, n))


def test_scored_tokens_counted_through_the_model(tiny):
    """Batching changes nothing: same tokens scored, same NLL."""
    ids = _ids(77)
    a = perplexity(tiny, ids, context=20, stride=6, batch_size=1)
    b = perplexity(tiny, ids, context=20, stride=6, batch_size=5)
    assert a.n_tokens == b.n_tokens == 76
    assert a.nll_sum == pytest.approx(b.nll_sum, rel=1e-5)
    assert a.n_windows == len(windows(77, 20, 6))


def test_deterministic_and_mode_restored(tiny):
    ids = _ids(90)
    tiny.train()
    r1 = perplexity(tiny, ids, context=32, stride=16)
    assert tiny.training  # restored
    tiny.eval()
    r2 = perplexity(tiny, ids, context=32, stride=16)
    assert r1.nll_sum == r2.nll_sum


def test_byte_and_word_normalisation(tiny):
    ids = _ids(60)
    text = "héllo wörld " * 10  # multi-byte characters: bytes != characters
    r = perplexity(tiny, ids, context=64, text=text)
    assert r.n_bytes == len(text.encode("utf-8")) == 140 and r.n_words == 20
    assert r.bits_per_byte == pytest.approx(r.nll_sum / (math.log(2) * 140))
    assert r.word_ppl == pytest.approx(math.exp(r.nll_sum / 20))
    d = r.to_dict()
    assert {"token_ppl", "nll_sum", "n_tokens", "bits_per_byte", "word_ppl", "context", "stride", "normalisation"} <= set(d)
    assert perplexity(tiny, ids, context=64).bits_per_byte is None


def test_bad_inputs(tiny):
    with pytest.raises(ValueError, match="empty corpus"):
        perplexity(tiny, torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match="empty corpus"):
        perplexity(tiny, torch.tensor([5]))
    with pytest.raises(ValueError, match="longer than the model allows.*128"):
        perplexity(tiny, _ids(300), context=256)
    with pytest.raises(ValueError, match="stride"):
        perplexity(tiny, _ids(50), context=16, stride=17)
    with pytest.raises(ValueError, match="1-D"):
        perplexity(tiny, _ids(50)[None], context=16)
    with pytest.raises(ValueError, match="batch_size"):
        perplexity(tiny, _ids(50), context=16, batch_size=0)


def test_works_after_a_swap(tiny):
    import copy

    from hf_attn_swap import swap_attention

    ids = _ids(80)
    m = swap_attention(copy.deepcopy(tiny), "gqa", groups=2)  # groups == current KV heads: exact
    assert perplexity(m, ids, context=32).nll_sum == pytest.approx(perplexity(tiny, ids, context=32).nll_sum, rel=1e-5)
    mq = swap_attention(copy.deepcopy(tiny), "mqa")
    assert perplexity(mq, ids, context=32).n_tokens == 79
