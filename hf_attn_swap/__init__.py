"""hf-attn-swap."""
