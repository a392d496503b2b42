"""Per-architecture facts as data: one row per ``model_type``.

A row says where the attention modules are, how their Q/K/V/O projections are laid out, which module attributes cache
head counts, whether vanilla transformers can load a GQA checkpoint of that family, and how RoPE pairs dimensions.
The code that reads and writes projections (:mod:`.projections`) is shared by every row; adding an architecture is
adding a row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ArchAdapter:
    """How one transformers architecture lays out its attention.

    Attributes:
        model_type: ``config.model_type``.
        attention_classes: class names of the self-attention modules to convert.
        layout: ``separate`` (q/k/v/o Linear), ``fused_qkv`` (one Linear, rows [Q | K | V]), ``fused_interleaved``
            (GPT-NeoX: one Linear, rows [q_h, k_h, v_h] per head), ``conv1d`` (GPT-2: transposed Conv1D ``c_attn``
            with columns [Q | K | V]).
        q, k, v: projection names (for fused layouts ``q`` names the fused projection).
        o: output projection path from the attention module; ``^`` steps up to the parent (BERT keeps it beside).
        head_dim_attr: module attribute holding the head size.
        module_attrs: module attributes to rewrite after conversion, each mapped to ``"groups"`` (query heads per KV
            head) or ``"kv_heads"``; transformers caches these in ``__init__``.
        native_gqa: vanilla transformers loads a checkpoint whose ``num_key_value_heads`` is smaller than the heads.
        rope: ``rotate_half`` (dims i and i + r/2 rotate together) or ``None``.
        qk_norm: keys go through a norm after ``k_proj`` (Qwen3, Gemma3): pooling weights is then not pooling keys,
            so the calibrated strategy keeps mean-pooled keys.
        causal: decoder (causal) or encoder attention.
        patch: name of a forward replacement needed for GQA (see :mod:`.patches`), or None.
        notes: why the row looks the way it does.
    """

    model_type: str
    attention_classes: tuple[str, ...]
    layout: str = "separate"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    head_dim_attr: str = "head_dim"
    module_attrs: dict[str, str] = field(default_factory=lambda: {"num_key_value_groups": "groups"})
    native_gqa: bool = True
    rope: str | None = "rotate_half"
    qk_norm: bool = False
    causal: bool = True
    patch: str | None = None
    notes: str = ""


def _llama_like(model_type: str, cls: str, **kw: Any) -> ArchAdapter:
    return ArchAdapter(model_type=model_type, attention_classes=(cls,), **kw)


ADAPTERS: dict[str, ArchAdapter] = {
    a.model_type: a
    for a in (
        _llama_like("llama", "LlamaAttention"),
        _llama_like("mistral", "MistralAttention"),
        _llama_like("qwen2", "Qwen2Attention", notes="q/k/v biases: pooled like the weights"),
        _llama_like("qwen3", "Qwen3Attention", qk_norm=True),
        _llama_like("gemma", "GemmaAttention"),
        _llama_like("gemma2", "Gemma2Attention", notes="attention logit softcap passed as kwarg"),
        _llama_like("gemma3_text", "Gemma3Attention", qk_norm=True),
        _llama_like(
            "phi3",
            "Phi3Attention",
            layout="fused_qkv",
            q="qkv_proj",
            module_attrs={"num_key_value_groups": "groups", "num_key_value_heads": "kv_heads"},
            notes="qkv_proj rows [Q | K | V]; the forward slices K/V by module.num_key_value_heads",
        ),
        ArchAdapter(
            model_type="gpt2",
            attention_classes=("GPT2Attention",),
            layout="conv1d",
            q="c_attn",
            o="c_proj",
            native_gqa=False,
            rope=None,
            module_attrs={"num_key_value_groups": "groups"},
            notes="c_attn is split by module.split_size, which we set to [E, kv, kv]; eager GPT-2 never repeats K/V, "
            "so converted GPT-2 always runs the grouped attention function",
        ),
        ArchAdapter(
            model_type="gpt_neox",
            attention_classes=("GPTNeoXAttention",),
            layout="fused_interleaved",
            q="query_key_value",
            o="dense",
            head_dim_attr="head_size",
            native_gqa=False,
            patch="gpt_neox",
            notes="query_key_value is interleaved per head; after conversion it is re-laid [Q | K | V] and the "
            "module's forward is replaced (partial rotary kept)",
        ),
        ArchAdapter(
            model_type="bert",
            attention_classes=("BertSelfAttention",),
            q="query",
            k="key",
            v="value",
            o="^output.dense",
            head_dim_attr="attention_head_size",
            native_gqa=False,
            rope=None,
            causal=False,
            notes="views K/V with -1 heads, so shrinking key/value works; BERT's eager path does not repeat K/V, so "
            "converted BERT always runs the grouped attention function",
        ),
    )
}

#: families that cannot be converted correctly, and why (an error names them instead of computing garbage).
UNSUPPORTED: dict[str, str] = {
    "opt": "OPT reshapes K/V with num_heads: shrinking k_proj/v_proj runs without error and computes garbage",
    "falcon": "Falcon hard-codes its attention classes and ignores custom attention implementations",
    "gptj": "GPT-J does not route attention through transformers' AttentionInterface",
    "bloom": "Bloom does not route attention through transformers' AttentionInterface",
    "mpt": "MPT does not route attention through transformers' AttentionInterface",
    "codegen": "CodeGen does not route attention through transformers' AttentionInterface",
}


def get_adapter(model_or_config: Any) -> ArchAdapter:
    """The adapter row for a model (or config); ``ValueError`` naming the supported types otherwise."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type in ADAPTERS:
        return ADAPTERS[model_type]
    supported = ", ".join(sorted(ADAPTERS))
    reason = UNSUPPORTED.get(model_type)
    why = f" ({reason})" if reason else ""
    raise ValueError(f"model_type {model_type!r} is not supported{why}; supported model types: {supported}")
