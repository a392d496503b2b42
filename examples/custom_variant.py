"""Register your own attention variant in a few lines and switch a real model to it.

Run: python examples/custom_variant.py
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hf_attn_swap import VariantConfig, register_variant, swap_attention, unswap_attention
from hf_attn_swap.zoo import load_model


@dataclass
class TemperatureConfig(VariantConfig):
    """Softmax attention with a temperature on the logits."""

    temperature: float = 1.0

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


@register_variant("temperature_sdpa", config=TemperatureConfig)
def temperature_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """SDPA with logits divided by a per-layer temperature."""
    cfg = module.hf_attn_swap.config  # per-layer options live on the module, never in kwargs
    scale = (scaling if scaling is not None else query.shape[-1] ** -0.5) / cfg.temperature
    causal = attention_mask is None and query.shape[2] > 1 and getattr(module, "is_causal", True)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, scale=scale, is_causal=causal,
        enable_gqa=key.shape[1] != query.shape[1],
    )
    return out.transpose(1, 2), None  # transformers wants (batch, q_len, heads, head_dim)


if __name__ == "__main__":
    model, tok = load_model("smollm2-135m")
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        before = model(ids).logits[0, -1]
        swap_attention(model, "temperature_sdpa", temperature=2.0, layers="0-14")  # first half only
        hotter = model(ids).logits[0, -1]
        unswap_attention(model)  # attention-only swaps undo exactly
        after = model(ids).logits[0, -1]
    print("next token before:", tok.decode(before.argmax()), "| with temperature 2 on layers 0-14:", tok.decode(hotter.argmax()))
    print("undo restores exactly:", torch.equal(before, after))
