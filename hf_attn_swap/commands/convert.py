"""``hf-attn-swap convert``: convert a model's attention, measure perplexity before/after, save the result."""

from __future__ import annotations

import argparse
import json
import time

from dataclasses import dataclass

from ..cli import echo, use_threads
from ..cliconfig import add_config_command, check_fields, config_from_args, dump_yaml, opt


@dataclass
class ConvertConfig:
    """Options of ``hf-attn-swap convert``."""

    model: str = opt("smollm2-135m", help="short name (see hf_attn_swap.zoo) or a local model directory")
    variant: str = opt("mqa:strategy=fit", help=(
        "one variant spec, e.g. gqa:groups=1,strategy=fit (see hf-attn-swap variants)"))
    layers: str | None = opt(None, help="layers to convert, e.g. 0-14 (null = all)")
    corpus: str = opt("shakespeare", help="calibration (train split) and evaluation (validation split) text")
    calib_tokens: int = opt(4096, min=1, help="calibration tokens for strategy=fit or align")
    eval_tokens: int = opt(4096, min=0, help="held-out tokens for perplexity (0 = skip)")
    context: int = opt(512, min=2, help="perplexity window")
    threads: int | None = opt(1, min=1, help=(
        "torch threads (1: measured best for fit calibration on a busy 2-core machine; null = torch's default)"))
    out: str | None = opt(None, help="save the converted model here (atomic, with sidecar)")
    overwrite: bool = opt(False, help="allow saving into an output directory that already holds a model")
    dtype: str = opt("float32", choices=("float32", "bfloat16", "float16"),
                     help="dtype the weights are loaded, calibrated and saved in")
    device: str = opt("auto", help=(
        "where the model is loaded and calibrated: auto (the GPU when there is one, else cpu), cpu, cuda, cuda:N"))

    def __post_init__(self) -> None:
        check_fields(self)


def register(sub: argparse._SubParsersAction) -> None:
    p = add_config_command(
        sub, "convert", ConvertConfig,
        help="swap/convert a model's attention (e.g. MHA -> GQA/MQA), report held-out perplexity, save it",
        description="Convert one model's attention, measure held-out perplexity before and after (sentence-embedding "
        "fidelity for encoders), and optionally save the result (vanilla where possible, else with a sidecar).",
        examples=[
            "hf-attn-swap convert --model smollm2-135m --variant mqa:strategy=fit --out out/mqa",
            "hf-attn-swap convert --variant sliding_window:window=256 --layers 0-14 --eval-tokens 2048",
            "hf-attn-swap convert --model minilm-l6 --variant gqa:groups=3,strategy=fit --threads 2",
        ],
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..specs import parse_variant_list

    cfg = config_from_args(ConvertConfig, args)
    if args.print_config:
        echo(dump_yaml(cfg), end="")
        return 0
    specs = parse_variant_list(cfg.variant)  # bad specs fail here, before torch or the model load
    if len(specs) != 1:
        raise ValueError(f"--variant takes one variant, got {len(specs)}: use a per-layer plan from Python instead")
    use_threads(cfg.threads)

    import copy

    from ..api import swap_attention, swap_record
    from ..checkpoint import save_swapped
    from ..convert.pooling import CALIBRATED
    from ..data import load_text, token_blocks, tokenize
    from ..outputs import CHECKPOINT_KIND, check_output_dir
    from ..registry import get_variant
    from ..zoo import load_model

    name, options = specs[0]
    get_variant(name).config_cls.from_dict(options)  # unknown variant or option: fail before loading the model
    if cfg.out:  # before loading anything: a bad --out must not cost a conversion
        check_output_dir(cfg.out, overwrite=cfg.overwrite, kind=CHECKPOINT_KIND)
    model, tok = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)  # checks folder/dtype/memory first
    causal = type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))  # else an encoder (embeddings)
    if tok is None and (cfg.eval_tokens or not causal):
        raise ValueError(f"{cfg.model} has no tokenizer: only a causal LM converted with --eval-tokens 0 can run "
                         "without one (calibration then uses random token ids)")
    calibration = None
    if options.get("strategy") in CALIBRATED and tok is None:
        import torch

        # A random-initialised checkpoint has no tokenizer: uniformly random ids within its vocabulary (seeded).
        gen = torch.Generator().manual_seed(0)
        n_blocks = max(1, cfg.calib_tokens // 512)
        calibration = torch.randint(0, model.config.vocab_size, (n_blocks, min(512, cfg.calib_tokens)), generator=gen)
        echo(f"calibration: {calibration.numel()} random token ids (no tokenizer in {cfg.model})")
    elif options.get("strategy") in CALIBRATED:
        train = load_text(cfg.corpus, split="train")
        if causal:
            calibration = token_blocks(tok, train, 512, max_tokens=cfg.calib_tokens)
        else:
            from ..eval.embeddings import sentences_of

            sents = sentences_of(train, limit=max(32, cfg.calib_tokens // 32))
            calibration = [dict(tok(sents[i : i + 32], padding=True, truncation=True, return_tensors="pt"))
                           for i in range(0, len(sents), 32)]
    report: dict = {"model": cfg.model, "variant": name, "options": options}
    if causal and cfg.eval_tokens:
        from ..eval.perplexity import perplexity

        text = load_text(cfg.corpus, split="validation")
        ids = tokenize(tok, text, max_tokens=cfg.eval_tokens)
        before = perplexity(model, ids, context=cfg.context)
        report["ppl_before"] = round(before.token_ppl, 3)
        echo(f"perplexity before: {before.token_ppl:.2f} ({before.n_tokens} held-out tokens of {cfg.corpus})")
    reference = copy.deepcopy(model) if not causal else None
    t = time.perf_counter()
    swap_attention(model, name, layers=cfg.layers, calibration=calibration, **options)
    report["convert_s"] = round(time.perf_counter() - t, 2)
    report["steps"] = [
        {**s, "layers": f"{s['layers'][0]}-{s['layers'][-1]}" if s["layers"] == list(range(s["layers"][0], s["layers"][-1] + 1))
         else s["layers"]}
        for s in swap_record(model).to_dict()["steps"]
    ]
    echo(f"converted with {name} {options} in {report['convert_s']} s")
    if causal and cfg.eval_tokens:
        after = perplexity(model, ids, context=cfg.context)
        report["ppl_after"] = round(after.token_ppl, 3)
        echo(f"perplexity after:  {after.token_ppl:.2f}")
    elif not causal:
        from ..eval.embeddings import embedding_fidelity, sentence_embeddings, sentences_of

        held = sentences_of(load_text(cfg.corpus, split="validation"), limit=256)
        cos = embedding_fidelity(sentence_embeddings(reference, tok, held), sentence_embeddings(model, tok, held))
        report["embedding_cosine"] = round(cos, 4)
        echo(f"sentence-embedding cosine to the original: {cos:.4f} ({len(held)} held-out sentences)")
    if cfg.out:
        save_swapped(model, cfg.out, tokenizer=tok, overwrite=cfg.overwrite)
        echo(f"saved to {cfg.out}")
    echo(json.dumps(report, indent=2))
    return 0
