"""hf-attn-swap: change a pretrained transformers model's attention and measure what it gains and loses.

Public API::

    from hf_attn_swap import swap_attention
    swap_attention(model, "gqa", groups=1, strategy="fit", calibration=input_ids)
"""

from .api import (
    SwapRecord,
    SwapStep,
    attention_sites,
    kv_heads_per_layer,
    parse_layers,
    swap_attention,
    swap_record,
    unswap_attention,
)
from .configs import VariantConfig
from .registry import LayerSwap, VariantSpec, get_variant, layer_swap, list_variants, register_variant
from .variants.flash import FlashConfig
from .variants.gqa import GQAConfig, MQAConfig
from .variants.linear import LinearConfig
from .variants.sliding_window import SlidingWindowConfig
from .variants.sparse import SparseConfig

__version__ = "0.1.0"

__all__ = [
    "FlashConfig",
    "GQAConfig",
    "LayerSwap",
    "LinearConfig",
    "MQAConfig",
    "SlidingWindowConfig",
    "SparseConfig",
    "SwapRecord",
    "SwapStep",
    "VariantConfig",
    "VariantSpec",
    "attention_sites",
    "get_variant",
    "kv_heads_per_layer",
    "layer_swap",
    "list_variants",
    "parse_layers",
    "register_variant",
    "swap_attention",
    "swap_record",
    "unswap_attention",
]

# Evaluation (hf_attn_swap.eval): perplexity, and the comparison recipe behind `hf-attn-swap eval`.
from .eval import PerplexityResult, perplexity, perplexity_of_text  # noqa: E402
from .eval.compare import EvalConfig, run_comparison  # noqa: E402

__all__ += ["EvalConfig", "PerplexityResult", "perplexity", "perplexity_of_text", "run_comparison"]

# Calibration statistics of attention inputs (layer by layer where the model allows).
from .convert.calibrate import second_moments  # noqa: E402

__all__ += ["second_moments"]
