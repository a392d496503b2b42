"""The comparison recipe's held-out domains (``perplexity.domains``) and uptrained rows (``uptrained``): figures
against an independent perplexity, ratios and recovery computed from them, the reports, and the bad inputs."""

from __future__ import annotations

import copy
import csv
import json
import math
from pathlib import Path

import pytest
import torch
from plain_perplexity import plain_perplexity
from test_eval_recipe import ROOT, _small, tiny_dir  # noqa: F401 - tiny_dir is a fixture used below

from hf_attn_swap.eval.compare import ConfigError, load_config, run_comparison

MAX_TOKENS, CONTEXT = 300, 64
SPEED = {"speed.prefill_lengths": "[16]", "speed.decode_contexts": "[16]", "speed.decode_batch_sizes": "[1]",
         "speed.decode_steps": "2", "speed.repeats": "1", "passkey.enabled": "false", "plot": "false"}


@pytest.fixture(scope="module")
def domain_dir(tiny_dir):  # noqa: F811 - the fixture imported above
    """A second local domain (other words than the main corpus) and an "uptrained" checkpoint: the tiny model
    converted to 2 KV heads, then trained a few steps on the corpus's train split and saved like uptraining saves."""
    import random

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_attn_swap import swap_attention
    from hf_attn_swap.checkpoint import save_swapped
    from hf_attn_swap.data import load_text, token_blocks

    rng = random.Random(1)
    words = "a ship sails on the cold sea under a grey moon while sailors sing and row home".split()
    (tiny_dir / "sea.txt").write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(60)) + "."
                                                  for _ in range(400)))
    tok = AutoTokenizer.from_pretrained(tiny_dir / "model")
    model = AutoModelForCausalLM.from_pretrained(tiny_dir / "model")
    swap_attention(model, "gqa", groups=2)
    blocks = token_blocks(tok, load_text(str(tiny_dir / "corpus.txt"), split="train"), CONTEXT, max_tokens=8 * CONTEXT)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(8):
        batch = blocks[step % len(blocks)][None]
        model(batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    save_swapped(model.eval(), tiny_dir / "uptrained", tokenizer=tok)
    return tiny_dir


def _args(root: Path, out: Path, variants: str = "baseline,gqa:groups=2", **extra: str) -> list[str]:
    return _small(root, out, variants, **{**SPEED, **extra})


def _ids(tok, name: str) -> torch.Tensor:
    from hf_attn_swap.data import load_text, tokenize

    return tokenize(tok, load_text(name, split="validation"), MAX_TOKENS)


def test_domain_perplexity_ratios_and_recovery(domain_dir, tmp_path, capsys):
    from test_eval_recipe import _recipe
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_attn_swap import readme, swap_attention

    sea, ckpt, out = str(domain_dir / "sea.txt"), str(domain_dir / "uptrained"), tmp_path / "run"
    domains = [sea, "kjv", str(domain_dir / "corpus.txt")]  # two local files and a real corpus by name
    args = _args(domain_dir, out, **{"perplexity.domains": f"[{','.join(domains)}]", "plot": "true",
                                     "uptrained": f"{{{ckpt}: 'gqa:groups=2'}}"})
    assert _recipe().main(args) == 0
    printed = capsys.readouterr().out
    records = json.loads((out / "results.json").read_text())
    assert [r["variant"] for r in records] == ["baseline", "gqa:groups=2", f"gqa:groups=2, uptrained ({ckpt})"]
    assert all(r["status"] == "ok" for r in records), [r.get("reason") for r in records]

    # every figure equals an independent perplexity of an independently built model on that domain's validation split
    tok = AutoTokenizer.from_pretrained(domain_dir / "model")
    plain = AutoModelForCausalLM.from_pretrained(domain_dir / "model").eval()
    converted = swap_attention(copy.deepcopy(plain), "gqa", groups=2)
    uptrained = AutoModelForCausalLM.from_pretrained(ckpt).eval()  # a llama GQA checkpoint loads vanilla
    base, conv, up = records
    for rec, model in ((base, plain), (conv, converted), (up, uptrained)):
        assert list(rec["domain_perplexity"]) == domains
        for d in domains:
            ids = _ids(tok, d)
            assert ids.numel() == MAX_TOKENS
            assert rec["domain_perplexity"][d] == pytest.approx(plain_perplexity(model, ids, CONTEXT), rel=1e-5), d
    # the domains differ (not one text scored three times), and the main corpus (split "all") is not its validation
    assert len({round(v, 6) for v in base["domain_perplexity"].values()}) == 3
    assert base["perplexity"] != pytest.approx(base["domain_perplexity"][domains[2]], rel=1e-6)

    # ratios and recovery from those figures: ln-gap share won back over the untrained row, per text
    for rec in (conv, up):
        for d in domains:
            assert rec["domain_ppl_ratio"][d] == pytest.approx(rec["domain_perplexity"][d] / base["domain_perplexity"][d])
    assert base["domain_ppl_ratio"] == {d: pytest.approx(1.0) for d in domains}
    assert "domain_recovery" not in conv and "recovery" not in conv  # only uptrained rows have one

    def share(b: float, c: float, u: float) -> float:
        return (math.log(c) - math.log(u)) / (math.log(c) - math.log(b))

    assert up["trained"] is True and up["kv_heads"] == [2]
    assert up["recovery"] == pytest.approx(share(base["perplexity"], conv["perplexity"], up["perplexity"]))
    for d in domains:
        want = share(base["domain_perplexity"][d], conv["domain_perplexity"][d], up["domain_perplexity"][d])
        assert up["domain_recovery"][d] == pytest.approx(want)
    # trained on the corpus's train split: it wins back more on that corpus than on the unrelated sea text
    assert up["domain_recovery"][domains[2]] > up["domain_recovery"][sea]

    # the reports carry the same numbers
    kjv_conv = conv["domain_perplexity"]["kjv"]
    assert f"kjv {kjv_conv:.3g} ({conv['domain_ppl_ratio']['kjv']:.2f}x)" in printed
    assert f"    recovery {up['recovery']:.3f}, {sea} {up['domain_recovery'][sea]:.3f}, kjv" in printed
    assert (out / "pareto.png").is_file()
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert float(rows[1]["ppl_kjv"]) == pytest.approx(conv["domain_perplexity"]["kjv"], rel=1e-5)
    assert float(rows[1]["ppl_ratio_kjv"]) == pytest.approx(conv["domain_ppl_ratio"]["kjv"], rel=1e-5)
    assert float(rows[2]["recovery_kjv"]) == pytest.approx(up["domain_recovery"]["kjv"], rel=1e-5)
    assert rows[0]["recovery"] == "" and float(rows[2]["recovery"]) == pytest.approx(up["recovery"], rel=1e-5)
    md = (out / "results.md").read_text()
    table = md[md.index("## Perplexity per domain"):]
    assert "| variant | " + " | ".join(domains) + " |" in table
    assert f"{kjv_conv:.2f} ({conv['domain_ppl_ratio']['kjv']:.2f}x)" in table.splitlines()[5]
    recovery = md[md.index("## Recovery per domain"):]
    assert f"| {up['variant']} | {up['recovery']:.3f} | " + " | ".join(
        f"{up['domain_recovery'][d]:.3f}" for d in domains) + " |" in recovery
    run = json.loads((out / "run.json").read_text())
    assert run["domain_tokens"] == {d: MAX_TOKENS for d in domains}
    assert "kjv" in [c.get("name") for c in run["provenance"]["corpora"]]
    assert len(run["provenance"]["models"]) == 2  # the baseline's weights and the checkpoint's
    assert readme.main(["--check", str(out / "results.md"), "--root", str(ROOT)]) == 0  # a pure function of the JSON


def test_main_corpus_as_a_domain_is_measured_once(tiny_dir, tmp_path):  # noqa: F811
    """Listing the main corpus (validation split) as a domain reuses its figure: the same ids, the same number."""
    corpus = str(tiny_dir / "corpus.txt")
    cfg = load_config(None, _args(tiny_dir, tmp_path / "o", **{"perplexity.split": "validation",
                                                              "perplexity.domains": f"[{corpus}]",
                                                              "variants": "baseline"}))
    (base,) = run_comparison(cfg, write=False)
    assert base["domain_perplexity"] == {corpus: base["perplexity"]}


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if anything tries to load a model (bad input must be refused before)."""
    import hf_attn_swap.eval.compare as compare
    import hf_attn_swap.zoo as zoo

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr(compare, "_load", refuse)
    monkeypatch.setattr(zoo, "load_model", refuse)


def test_bad_domains_refused_before_any_model_loads(domain_dir, tmp_path, no_model_load):
    from hf_attn_swap.data import list_corpora

    def run(out: str, **extra: str):
        with pytest.raises(ValueError) as err:
            run_comparison(load_config(None, _args(domain_dir, tmp_path / out, **extra)))
        assert not (tmp_path / out).exists()  # nothing written
        return str(err.value)

    msg = run("a", **{"perplexity.domains": "[kjv,nope]"})
    assert msg.startswith("perplexity.domains: unknown domain 'nope'; allowed: " + ", ".join(list_corpora()))
    assert "\n" not in msg
    assert "lists 'kjv' twice" in run("b", **{"perplexity.domains": "[kjv,sotu,kjv]"})
    sea = domain_dir / "sea.txt"
    msg = run("c", **{"perplexity.domains": f"[{sea},{sea.parent}/../{sea.parent.name}/sea.txt]"})
    assert f"lists '{sea}' twice (as '{sea}' and " in msg  # one file under two spellings
    # a validation split shorter than max_tokens: the message says how long it is
    from transformers import AutoTokenizer

    from hf_attn_swap.data import load_text, tokenize

    n = tokenize(AutoTokenizer.from_pretrained(domain_dir / "model"), load_text(str(sea), split="validation")).numel()
    msg = run("d", **{"perplexity.domains": f"[{sea}]", "perplexity.max_tokens": str(n + 1)})
    assert msg == (f"perplexity.domains: the validation split of '{sea}' is {n} tokens long, shorter than "
                   f"perplexity.max_tokens={n + 1}; lower max_tokens or drop '{sea}'")
    # uptrained checkpoints: a missing folder, and one whose tokenizer is not the baseline's
    msg = run("e", uptrained=f"{{{tmp_path / 'nowhere'}: 'gqa:groups=2'}}")
    assert msg.startswith("uptrained: model folder") and "does not exist" in msg
    other = _other_tokenizer_checkpoint(domain_dir)
    assert "has another tokenizer" in run("f", uptrained=f"{{{other}: 'gqa:groups=2'}}")


def _other_tokenizer_checkpoint(root: Path) -> Path:
    """The uptrained checkpoint with a tokenizer trained on other text."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    other = root / "other_tok"
    if not other.exists():
        shutil.copytree(root / "uptrained", other)
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.train_from_iterator([(root / "sea.txt").read_text()], trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(other)
    return other


def test_uptrained_needs_its_conversion_row():
    with pytest.raises(ConfigError, match=r"uptrained: '/x' names 'mqa:strategy=fit' as its untrained conversion, "
                                          r"which is not one of the variants \(linear\); add it to variants"):
        load_config(None, ["variants=baseline,linear", "uptrained={/x: 'mqa:strategy=fit'}"])
    cfg = load_config(None, ["uptrained={/x: 'mqa: strategy=fit'}"])  # spelled loosely, stored as the row's spec
    assert cfg.uptrained == {"/x": "mqa:strategy=fit"}


def test_cli_refuses_an_unknown_domain_in_one_line(tiny_dir, tmp_path, capsys, no_model_load):  # noqa: F811
    from hf_attn_swap.cli import main

    rc = main(["eval", "--model", str(tiny_dir / "model"), "--out", str(tmp_path / "x"), "--set",
               "perplexity.domains=[kjv,nope]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "unknown domain 'nope'; allowed:" in err[0], err
    assert not (tmp_path / "x").exists()


def test_eval_domains_yaml_is_the_default_plus_every_offline_corpus():
    """recipes/configs/eval_domains.yaml: the default comparison unchanged, plus every corpus that needs no Hub."""
    from hf_attn_swap.data import CORPORA
    from hf_attn_swap.eval.config import EvalConfig

    path = ROOT / "recipes" / "configs" / "eval_domains.yaml"
    assert path.read_text().splitlines()[0].startswith("# hf-attn-swap eval --config recipes/configs/eval_domains.yaml")
    cfg = load_config(path).to_dict()
    default = EvalConfig().to_dict()
    domains = cfg["perplexity"].pop("domains")
    assert default["perplexity"].pop("domains") == []  # the default run's time does not grow
    cfg.pop("out"), default.pop("out")
    assert cfg == default
    offline = {name for name, c in CORPORA.items() if c.registry != "hub"}
    assert {"shakespeare", "kjv", "sotu"} | offline <= set(domains) and len(set(domains)) == len(domains)
