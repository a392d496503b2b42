"""hf-attn-swap: change a pretrained transformers model's attention and measure what it gains and loses.

Public API::

    from hf_attn_swap import swap_attention
    swap_attention(model, "gqa", groups=1, strategy="fit", calibration=input_ids)
"""

__version__ = "0.1.0"

# The public names load on first use (PEP 562): ``hf-attn-swap --help`` imports this package and must not pay for
# torch and transformers (seconds). ``from hf_attn_swap import swap_attention`` works exactly as before.
_EXPORTS = {
    "SwapRecord": "api",
    "SwapStep": "api",
    "attention_sites": "api",
    "kv_heads_per_layer": "api",
    "parse_layers": "api",
    "swap_attention": "api",
    "swap_record": "api",
    "unswap_attention": "api",
    "VariantConfig": "configs",
    "LayerSwap": "registry",
    "VariantSpec": "registry",
    "get_variant": "registry",
    "layer_swap": "registry",
    "list_variants": "registry",
    "register_variant": "registry",
    "FlashConfig": "variants.flash",
    "GQAConfig": "variants.gqa",
    "MQAConfig": "variants.gqa",
    "LinearConfig": "variants.linear",
    "SlidingWindowConfig": "variants.sliding_window",
    "SparseConfig": "variants.sparse",
    # evaluation (hf_attn_swap.eval): perplexity, and the comparison recipe behind `hf-attn-swap eval`
    "EvalConfig": "eval.config",
    "PerplexityResult": "eval.perplexity",
    "perplexity": "eval.perplexity",
    "perplexity_of_text": "eval.perplexity",
    "run_comparison": "eval.compare",
    # files on disk: saving/loading swapped models with verified hashes, and the output-folder check every writer runs
    "CheckpointIntegrityError": "checkpoint",
    "SidecarMismatchError": "checkpoint",
    "load_swapped": "checkpoint",
    "save_swapped": "checkpoint",
    "verify_checkpoint": "checkpoint",
    "OutputDirError": "outputs",
    "check_output_dir": "outputs",
    # device and dtype names of eval/uptrain, checked (and probed) before anything loads
    "resolve_device_dtype": "devices",
    # text: named corpora (deterministic train/validation split) and the domain each belongs to
    "corpus_domain": "data",
    "list_corpora": "data",
    "load_text": "data",
    # calibration statistics of attention inputs (layer by layer where the model allows)
    "second_moments": "convert.calibrate",
    # speed at scale: a cache filled to a length, the roofline model and the projection behind `hf-attn-swap plan`
    "fill_cache": "eval.cache_fill",
    "plan": "eval.roofline",
}
#: submodules exported as such: progress bars (off in the library, on in the CLI): ``hf_attn_swap.progress.enable()``.
_SUBMODULES = ("progress",)

from ._lazy import lazy_exports  # noqa: E402

__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS, _SUBMODULES)


__all__ = sorted([*_EXPORTS, *_SUBMODULES])
