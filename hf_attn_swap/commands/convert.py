"""``hf-attn-swap convert``: convert a model's attention, measure perplexity before/after, save the result."""

from __future__ import annotations

import argparse
import json
import time

from ..cli import echo


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="swap/convert a model's attention (e.g. MHA -> GQA/MQA), report held-out perplexity, save it",
        description="Example: hf-attn-swap convert --model smollm2-135m --variant mqa:strategy=fit --out out/mqa",
    )
    p.add_argument("--model", default="smollm2-135m", help="short name (see zoo) or a local directory")
    p.add_argument("--variant", default="mqa:strategy=fit",
                   help="one variant spec, e.g. 'gqa:groups=1,strategy=fit' (see `hf-attn-swap variants`)")
    p.add_argument("--layers", default=None, help="layers to convert, e.g. '0-14' (default all)")
    p.add_argument("--corpus", default="shakespeare", help="calibration (train split) and evaluation (validation) text")
    p.add_argument("--calib-tokens", type=int, default=4096, help="calibration tokens for strategy=fit")
    p.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens for perplexity (0 = skip)")
    p.add_argument("--context", type=int, default=512, help="perplexity window")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype the weights are loaded, calibrated and saved in")
    p.add_argument("--device", default=None, help="where the model is loaded and calibrated: cpu, cuda, cuda:N "
                   "(default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="save the converted model here (atomic, with sidecar)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import copy

    import torch

    from ..api import swap_attention, swap_record
    from ..checkpoint import save_swapped
    from ..data import load_text, token_blocks, tokenize
    from ..specs import parse_variant_list
    from ..zoo import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    specs = parse_variant_list(args.variant)
    if len(specs) != 1:
        raise ValueError(f"--variant takes one variant, got {len(specs)}: use a per-layer plan from Python instead")
    name, options = specs[0]
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    causal = type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))  # else an encoder (embeddings)
    if tok is None and (args.eval_tokens or not causal):
        raise ValueError(f"{args.model} has no tokenizer: only a causal LM converted with --eval-tokens 0 can run "
                         "without one (calibration then uses random token ids)")
    calibration = None
    if options.get("strategy") == "fit" and tok is None:
        # A random-initialised checkpoint has no tokenizer: uniformly random ids within its vocabulary (seeded).
        gen = torch.Generator().manual_seed(0)
        n_blocks = max(1, args.calib_tokens // 512)
        calibration = torch.randint(0, model.config.vocab_size, (n_blocks, min(512, args.calib_tokens)), generator=gen)
        echo(f"calibration: {calibration.numel()} random token ids (no tokenizer in {args.model})")
    elif options.get("strategy") == "fit":
        train = load_text(args.corpus, split="train")
        if causal:
            calibration = token_blocks(tok, train, 512, max_tokens=args.calib_tokens)
        else:
            from ..eval.embeddings import sentences_of

            sents = sentences_of(train, limit=max(32, args.calib_tokens // 32))
            calibration = [dict(tok(sents[i : i + 32], padding=True, truncation=True, return_tensors="pt"))
                           for i in range(0, len(sents), 32)]
    report: dict = {"model": args.model, "variant": name, "options": options}
    if causal and args.eval_tokens:
        from ..eval.perplexity import perplexity

        text = load_text(args.corpus, split="validation")
        ids = tokenize(tok, text, max_tokens=args.eval_tokens)
        before = perplexity(model, ids, context=args.context)
        report["ppl_before"] = round(before.token_ppl, 3)
        echo(f"perplexity before: {before.token_ppl:.2f} ({before.n_tokens} held-out tokens of {args.corpus})")
    reference = copy.deepcopy(model) if not causal else None
    t = time.perf_counter()
    swap_attention(model, name, layers=args.layers, calibration=calibration, **options)
    report["convert_s"] = round(time.perf_counter() - t, 2)
    report["steps"] = [
        {**s, "layers": f"{s['layers'][0]}-{s['layers'][-1]}" if s["layers"] == list(range(s["layers"][0], s["layers"][-1] + 1))
         else s["layers"]}
        for s in swap_record(model).to_dict()["steps"]
    ]
    echo(f"converted with {name} {options} in {report['convert_s']} s")
    if causal and args.eval_tokens:
        after = perplexity(model, ids, context=args.context)
        report["ppl_after"] = round(after.token_ppl, 3)
        echo(f"perplexity after:  {after.token_ppl:.2f}")
    elif not causal:
        from ..eval.embeddings import embedding_fidelity, sentence_embeddings, sentences_of

        held = sentences_of(load_text(args.corpus, split="validation"), limit=256)
        cos = embedding_fidelity(sentence_embeddings(reference, tok, held), sentence_embeddings(model, tok, held))
        report["embedding_cosine"] = round(cos, 4)
        echo(f"sentence-embedding cosine to the original: {cos:.4f} ({len(held)} held-out sentences)")
    if args.out:
        save_swapped(model, args.out, tokenizer=tok)
        echo(f"saved to {args.out}")
    echo(json.dumps(report, indent=2))
    return 0
