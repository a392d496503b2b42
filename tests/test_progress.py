"""Progress bars: silent in the library unless enabled, on stderr (never stdout) when enabled, one switch for all."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny

from hf_attn_swap import perplexity, progress, swap_attention
from hf_attn_swap.eval.speed import compare_speed

IDS = torch.randint(3, 100, (200,), generator=torch.Generator().manual_seed(0))
CALIB = torch.randint(3, 100, (4, 24), generator=torch.Generator().manual_seed(1))
PPL_BAR = "perplexity (context 32"
FIT_BARS = ("calibration, layer by layer",)  # fit's bar: one step per layer, calibrated and fitted in turn


@pytest.fixture(autouse=True)
def switch_unset(monkeypatch):
    """Every test starts as a fresh process would: enable() never called, the environment variable unset."""
    monkeypatch.setattr(progress, "_enabled", None)
    monkeypatch.delenv(progress.ENV, raising=False)


def test_perplexity_is_silent_by_default(capsys):
    perplexity(tiny("llama"), IDS, context=32)
    out, err = capsys.readouterr()
    assert out == "" and PPL_BAR not in err and "window" not in err


def test_perplexity_bar_on_stderr_when_enabled(capsys):
    progress.enable()
    perplexity(tiny("llama"), IDS, context=32, batch_size=2)
    out, err = capsys.readouterr()
    assert out == ""  # stdout is for results
    assert PPL_BAR in err
    # 200 tokens, context 32 -> 7 windows; the bar closes at its total and states the rate.
    assert "7/7" in err and "100%" in err and "window/s" in err


def test_enable_false_silences_again(capsys):
    progress.enable()
    progress.enable(False)
    perplexity(tiny("llama"), IDS, context=32)
    assert PPL_BAR not in capsys.readouterr().err


def test_environment_variable_turns_bars_on_and_enable_overrides_it(capsys, monkeypatch):
    monkeypatch.setenv(progress.ENV, "1")
    perplexity(tiny("llama"), IDS, context=32)
    assert PPL_BAR in capsys.readouterr().err
    progress.enable(False)
    perplexity(tiny("llama"), IDS, context=32)
    assert PPL_BAR not in capsys.readouterr().err


def test_a_calls_own_progress_flag_shows_its_bar_while_the_switch_is_off(capsys):
    perplexity(tiny("llama"), IDS, context=32, progress=True)
    assert PPL_BAR in capsys.readouterr().err


def test_fit_conversion_is_silent_by_default(capsys):
    swap_attention(tiny("llama"), "gqa", groups=1, strategy="fit", calibration=CALIB)
    _, err = capsys.readouterr()
    assert not any(bar in err for bar in FIT_BARS)


def test_fit_conversion_shows_calibration_and_per_layer_bars(capsys):
    progress.enable()
    swap_attention(tiny("llama"), "gqa", groups=1, strategy="fit", calibration=CALIB)
    out, err = capsys.readouterr()
    assert out == ""
    assert all(bar in err for bar in FIT_BARS), err
    assert "2/2 [" in err and "layer/s" in err  # the tiny llama has 2 layers: one bar step per layer


def test_round_robin_timing_bar_counts_every_round(capsys):
    a, b = tiny("llama", seed=0), tiny("llama", seed=1)
    compare_speed({"a": a, "b": b}, prefill_lengths=[8], decode_contexts=[8], steps=2, repeats=2, warmup=1,
                  decode_warmup=1)
    assert "round-robin" not in capsys.readouterr().err
    progress.enable()
    compare_speed({"a": a, "b": b}, prefill_lengths=[8], decode_contexts=[8], steps=2, repeats=2, warmup=1,
                  decode_warmup=1)
    err = capsys.readouterr().err
    # prefill: 1 warm-up + 2 repeats; decode: 1 prefill + 1 warm-up + 2 steps -> 7 rounds, all reached.
    assert "timing 2 model(s) round-robin" in err and "7/7" in err
