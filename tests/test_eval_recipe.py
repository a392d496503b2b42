"""The comparison recipe end to end on a tiny model, its configs, its reports, passkey prompts and bad inputs."""

from __future__ import annotations

import csv
import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest
import torch
from plain_perplexity import plain_perplexity

from hf_attn_swap.eval.compare import ConfigError, EvalConfig, check_variants, load_config, run_comparison
from hf_attn_swap.eval.notes import annotate
from hf_attn_swap.eval.passkey import FILLER, INSTRUCTION, NEEDLE, QUESTION_PLAIN, build_prompt, score_answer
from hf_attn_swap.eval.report import pareto_front

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = {"variant", "perplexity", "prefill_ms", "decode_tokens_per_s", "kv_bytes"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A random 2-layer MHA llama + a byte-level BPE tokenizer trained here (no Hub), and a local corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tiny_eval")
    rng = random.Random(0)
    words = "the grass is green sky blue sun yellow here we go there and back again pass key what".split()
    text = "\n\n".join(" ".join(rng.choice(words) for _ in range(60)) + "." for _ in range(300))
    (root / "corpus.txt").write_text(text)
    (root / "empty.txt").write_text("   \n")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text, INSTRUCTION, FILLER * 5, NEEDLE.format(key="12345"), QUESTION_PLAIN], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    LlamaForCausalLM(cfg).save_pretrained(root / "model")
    fast.save_pretrained(root / "model")
    return root


def _small(tiny_dir: Path, out: Path, variants: str, **extra: str) -> list[str]:
    over = {
        "model": str(tiny_dir / "model"),
        "out": str(out),
        "variants": variants,
        "perplexity.corpus": str(tiny_dir / "corpus.txt"),
        "perplexity.max_tokens": "300",
        "perplexity.context": "64",
        "perplexity.split": "all",
        "calibration.split": "all",
        "calibration.tokens": "128",
        "calibration.block": "64",
        "speed.prefill_lengths": "[16, 32]",
        "speed.decode_contexts": "[16]",
        "speed.decode_batch_sizes": "[1, 2]",
        "speed.decode_steps": "3",
        "speed.repeats": "2",
        "passkey.lengths": "[96]",
        "passkey.depths": "[0.0, 1.0]",
        **extra,
    }
    return [f"{k}={v}" for k, v in over.items()]


def _recipe():
    spec = importlib.util.spec_from_file_location("eval_ppl_speed", ROOT / "recipes" / "eval_ppl_speed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_recipe_end_to_end_writes_every_output(tiny_dir, tmp_path):
    out = tmp_path / "run"
    variants = "baseline,gqa:groups=2,mqa:strategy=fit,sliding_window:window=512,gqa:groups=3,not_a_variant"
    assert _recipe().main(_small(tiny_dir, out, variants, missing="skip")) == 0  # the explicit opt-in

    records = json.loads((out / "results.json").read_text())
    assert isinstance(records, list) and [r["variant"] for r in records] == [
        "baseline", "gqa:groups=2", "mqa:strategy=fit", "sliding_window:window=512", "gqa:groups=3", "not_a_variant"]
    ok = [r for r in records if r["status"] == "ok"]
    assert len(ok) == 4
    for r in ok:
        assert REQUIRED <= set(r)
        assert r["prefill_ms"] > 0 and r["decode_tokens_per_s"] > 0 and r["kv_bytes"] > 0
        assert r["env"]["threads"] == 1 and r["env"]["device"] == "cpu" and r["env"]["dtype"] == "float32"
        assert set(r["passkey"]) == {"96@0", "96@1"} and 0 <= r["passkey_accuracy"] <= 1
        assert r["kv_analytic_match"] is True
    base, gqa, mqa, window = ok
    # the baseline's perplexity is the plain model's, computed independently on the same 300 tokens
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_attn_swap.data import load_text, tokenize

    tok = AutoTokenizer.from_pretrained(tiny_dir / "model")
    ids = tokenize(tok, load_text(str(tiny_dir / "corpus.txt"), split="all"), max_tokens=300)
    plain = AutoModelForCausalLM.from_pretrained(tiny_dir / "model").eval()
    assert base["perplexity"] == pytest.approx(plain_perplexity(plain, ids, 64), rel=1e-5)
    assert window["perplexity"] == pytest.approx(base["perplexity"], rel=1e-5)  # a 512 window covers context 64
    assert base["ppl_detail"]["n_tokens"] == 299
    assert gqa["kv_ratio"] == pytest.approx(0.5) and mqa["kv_ratio"] == pytest.approx(0.25)
    assert mqa["ppl_delta"] == pytest.approx(mqa["perplexity"] - base["perplexity"])
    # honesty: the window covers every measured context, GQA prefill cannot gain
    assert any("no saving possible" in n for n in window["notes"])
    assert window["perplexity"] == pytest.approx(base["perplexity"], rel=1e-4)  # fp32, different kernels
    assert any("same attention FLOPs" in n for n in gqa["notes"])
    failed, skipped = records[-2:]
    assert failed["status"] == "error" and "divide" in failed["reason"]  # 3 does not divide 4 KV heads: recorded
    assert skipped["status"] == "skipped" and "'not_a_variant' is not registered" in skipped["reason"]

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["variant"] for r in rows] == [r["variant"] for r in records]
    assert float(rows[1]["kv_ratio"]) == pytest.approx(0.5)
    md = (out / "results.md").read_text()
    assert "| variant | ppl |" in md and "not registered" in md and "Normalisation:" in md and "bits_per_byte" in md
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run = json.loads((out / "run.json").read_text())
    assert run["runtime_s"] > 0 and run["environment"]["threads"] == 1 and run["eval_tokens"] == 300
    # provenance: the exact weights file and text of this run, and the command as run
    import hashlib

    prov = run["provenance"]
    weights = hashlib.sha256((tiny_dir / "model" / "model.safetensors").read_bytes()).hexdigest()
    assert prov["models"][0]["weights_sha256"] == {"model.safetensors": weights}
    assert prov["corpora"][0]["path"] == str((tiny_dir / "corpus.txt").resolve())
    assert prov["command"] == run["command"] and prov["argv"][1:] == sys.argv[1:]  # the process as run (pytest here)
    assert (prov["device"], prov["dtype"]) == ("cpu", "float32")
    assert f"sha256 {weights[:12]}" in md and "## Provenance" in md
    from hf_attn_swap import readme

    assert readme.main(["--check", str(out / "results.md"), "--root", str(ROOT)]) == 0  # a pure function of the JSON


def test_cli_eval(tiny_dir, tmp_path, capsys):
    from hf_attn_swap.cli import main

    out = tmp_path / "cli"
    args = ["eval", "--model", str(tiny_dir / "model"), "--variants", "gqa:groups=1", "--out", str(out),
            "--corpus", str(tiny_dir / "corpus.txt"), "--split", "all", "--max-tokens", "200", "--context", "64",
            "--no-passkey", "--no-plot", "--set", "speed.prefill_lengths=[16]", "--set", "speed.decode_contexts=[16]",
            "--set", "speed.decode_batch_sizes=[1]", "--set", "speed.decode_steps=2", "--set", "speed.repeats=1"]
    assert main(args) == 0
    records = json.loads((out / "results.json").read_text())
    assert [r["variant"] for r in records] == ["baseline", "gqa:groups=1"]
    assert records[1]["passkey_accuracy"] is None and not (out / "pareto.png").exists()
    assert (out / "results.csv").exists() and (out / "results.md").exists()


def test_bad_inputs_give_clear_errors(tiny_dir, tmp_path, capsys):
    from hf_attn_swap.cli import main

    # empty corpus
    cfg = load_config(None, _small(tiny_dir, tmp_path / "a", "baseline", **{"perplexity.corpus": str(tiny_dir / "empty.txt")}))
    with pytest.raises(ValueError, match="empty"):
        run_comparison(cfg)
    # context longer than the model allows (max_position_embeddings=256)
    cfg = load_config(None, _small(tiny_dir, tmp_path / "b", "baseline", **{"perplexity.context": "512"}))
    with pytest.raises(ValueError, match="longer than the model allows.*256"):
        run_comparison(cfg)
    # unknown variant, when asked to fail; unknown option of a registered variant
    cfg = load_config(None, _small(tiny_dir, tmp_path / "c", "baseline,gqa:groups=2,nope", missing="error"))
    with pytest.raises(ValueError, match="'nope' is not registered.*gqa"):
        run_comparison(cfg)
    with pytest.raises(ValueError, match="unknown option.*'windw'.*window"):
        check_variants(EvalConfig(variants="sliding_window:windw=3"))
    # the CLI turns them into one line and exit status 2
    rc = main(["eval", "--model", str(tiny_dir / "model"), "--variants", "nope", "--missing", "error",
               "--out", str(tmp_path / "d")])
    assert rc == 2 and "'nope' is not registered" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()  # failed before doing anything


@pytest.mark.parametrize("path", sorted((ROOT / "recipes" / "configs").glob("eval_*.yaml")), ids=lambda p: p.name)
def test_yaml_configs_validate(path):
    text = path.read_text()
    assert "eval_ppl_speed.py" in text or "hf-attn-swap eval" in text  # each config shows how to launch it
    cfg = load_config(path)
    cfg.missing = "error"
    check_variants(cfg)  # every listed variant is registered and its options are valid
    assert cfg.variant_specs()[0] == ("baseline", {})


def test_builtin_defaults_are_the_default_yaml():
    """`hf-attn-swap eval` without --config runs exactly recipes/configs/eval_default.yaml."""
    assert load_config(ROOT / "recipes" / "configs" / "eval_default.yaml").to_dict() == EvalConfig().to_dict()


def test_config_validation_and_overrides():
    with pytest.raises(ConfigError, match=r"unknown key 'speed.thread' \(did you mean 'speed.threads'\?\).*allowed in speed: threads"):
        load_config(None, ["speed.thread=2"])
    with pytest.raises(ConfigError, match="unknown key 'modle' .did you mean 'model'"):
        EvalConfig.from_dict({"modle": "x"})
    with pytest.raises(ConfigError, match="stride"):
        load_config(None, ["perplexity.stride=1000"])
    with pytest.raises(ConfigError, match="passkey.depths"):
        load_config(None, ["passkey.depths=[1.5]"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["speed.threads"])
    with pytest.raises(ConfigError, match="'nosuch' is not a section .sections: perplexity, calibration, speed, passkey"):
        load_config(None, ["nosuch.key=1"])
    with pytest.raises(ConfigError, match="'model' is a str, not a section"):
        load_config(None, ["model.name=1"])
    cfg = load_config(ROOT / "recipes" / "configs" / "eval_quick.yaml", ["speed.threads=2", "passkey.lengths=[256,512]",
                                                                        "variants=gqa:groups=1,strategy=fit,linear"])
    assert cfg.speed.threads == 2 and cfg.passkey.lengths == [256, 512]
    assert cfg.variant_specs() == [("baseline", {}), ("gqa", {"groups": 1, "strategy": "fit"}), ("linear", {})]
    assert EvalConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()  # round trip


def test_passkey_prompts(tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir / "model")
    needle = tok(NEEDLE.format(key="54321"), add_special_tokens=False)["input_ids"]
    starts = []
    for depth in (0.0, 0.25, 0.5, 1.0):
        ids = build_prompt(tok, 160, depth, "54321")
        assert len(ids) == 160  # exact length: prompts of one length batch without padding
        starts.append(next(i for i in range(len(ids)) if ids[i : i + len(needle)] == needle))
        assert "54321" in tok.decode(ids) and tok.decode(ids).endswith(QUESTION_PLAIN)
    assert starts == sorted(starts) and starts[0] < starts[-1]
    with pytest.raises(ValueError, match="too short"):
        build_prompt(tok, 10, 0.5, "54321")
    with pytest.raises(ValueError, match="allowed: plain, chat"):
        build_prompt(tok, 160, 0.5, "54321", format="xml")
    assert score_answer(" 54321. Remember", "54321") and not score_answer(" 5432", "54321")
    assert not score_answer(" 543210", "54321") and not score_answer("no number", "54321")


def test_ratios_flag_noise_instead_of_reporting_it():
    cfg = EvalConfig()
    def rec(name, ms, iqr, tps_ms, opts=None):
        return {"variant": name, "name": name, "options": opts or {}, "status": "ok", "perplexity": 10.0,
                "kv_bytes": 100, "kv_bytes_analytic": 100, "passkey_accuracy": 1.0, "kv_heads": [3],
                "prefill_length": 512, "decode_context": 1024, "decode_batch": 4,
                "prefill": [{"length": 512, "batch": 1, "median_ms": ms, "q1_ms": ms - iqr, "q3_ms": ms + iqr}],
                "decode": [{"context": 1024, "batch": 4, "median_ms": tps_ms, "q1_ms": tps_ms - iqr, "q3_ms": tps_ms + iqr,
                            "tokens_per_s": 4000 / tps_ms}]}
    records = [rec("baseline", 100, 5, 50), rec("flash", 98, 5, 49), rec("gqa", 60, 2, 20, {"groups": 3}),
               rec("linear", 130, 2, 70, {"window": 64})]
    annotate(records, cfg)
    _, same, fast, hybrid = records
    assert same["prefill_significant"] is False and same["decode_significant"] is False
    assert any("noise" in n for n in same["notes"]) and any("cannot be faster" in n for n in same["notes"])
    assert fast["prefill_significant"] is True and fast["prefill_speedup"] == pytest.approx(100 / 60)
    assert fast["decode_speedup"] == pytest.approx(2.5) and fast["decode_significant"] is True
    assert any("no K/V heads merged" in n for n in fast["notes"])
    assert hybrid["decode_speedup"] < 1 and any("64-token window" in n for n in hybrid["notes"])


def test_pareto_front():
    # (tokens/s, ppl): faster and lower is better
    pts = [(100, 10.0), (200, 12.0), (150, 9.0), (50, 20.0), (200, 11.0)]
    assert pareto_front(pts) == [2, 4]


@pytest.mark.real
def test_smollm2_baseline_retrieves_the_passkey(smollm2):
    """The probe measures something on the default model: the baseline finds the key (plain format)."""
    from hf_attn_swap.eval.passkey import passkey_accuracy
    from hf_attn_swap.eval.speed import num_threads

    model, tok = smollm2
    with num_threads(1):  # the CPU is shared: one thread contends least
        r = passkey_accuracy(model, tok, lengths=[256], depths=[0.0, 1.0], trials=1)
    assert r.accuracy == 1.0, r.cells


def test_perplexity_of_text_and_the_evaluate_module(tiny_dir):
    """Bytes/words are counted on the evaluated span; the offline `evaluate` module returns the same numbers."""
    import evaluate
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_attn_swap.data import tokenize
    from hf_attn_swap.eval import perplexity, perplexity_of_text
    from hf_attn_swap.eval.strided_perplexity import METRIC_PATH

    tok = AutoTokenizer.from_pretrained(tiny_dir / "model")
    model = AutoModelForCausalLM.from_pretrained(tiny_dir / "model").eval()
    text = (tiny_dir / "corpus.txt").read_text()[:4000]
    cut = perplexity_of_text(model, tok, text, max_tokens=150, context=64)
    span = tok.decode(tokenize(tok, text, 150).tolist())
    assert cut.n_tokens == 149 and cut.n_bytes == len(span.encode()) < len(text.encode())
    with pytest.raises(ValueError, match="empty corpus"):
        perplexity_of_text(model, tok, "  \n", context=64)

    full = perplexity_of_text(model, tok, text, context=64, stride=32)
    assert full.n_bytes == len(text.encode()) and full.n_words == len(text.split())
    assert full.nll_sum == pytest.approx(perplexity(model, tokenize(tok, text), context=64, stride=32).nll_sum)
    got = evaluate.load(METRIC_PATH).compute(predictions=[text], model=model, tokenizer=tok, context=64, stride=32)
    assert got["token_perplexity"] == pytest.approx(full.token_ppl, rel=1e-6)
    assert got["bits_per_byte"] == pytest.approx(full.bits_per_byte, rel=1e-6)
    assert got["n_tokens"] == full.n_tokens
