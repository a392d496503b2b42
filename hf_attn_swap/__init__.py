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
from .variants.gqa import GQAConfig, MQAConfig

__version__ = "0.1.0"

__all__ = [
    "GQAConfig",
    "LayerSwap",
    "MQAConfig",
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
