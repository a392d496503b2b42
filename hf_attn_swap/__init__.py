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

# Files on disk: saving/loading swapped models with verified hashes, and the output-folder check every writer runs.
from .checkpoint import (  # noqa: E402
    CheckpointIntegrityError,
    SidecarMismatchError,
    load_swapped,
    save_swapped,
    verify_checkpoint,
)
from .outputs import OutputDirError, check_output_dir  # noqa: E402

__all__ += ["CheckpointIntegrityError", "OutputDirError", "SidecarMismatchError", "check_output_dir", "load_swapped",
            "save_swapped", "verify_checkpoint"]

# Progress bars (off in the library, on in the CLI): hf_attn_swap.progress.enable() / HF_ATTN_SWAP_PROGRESS=1.
from . import progress  # noqa: E402

__all__ += ["progress"]

# Device and dtype names of eval/uptrain, checked (and probed) before anything loads.
from .devices import resolve as resolve_device_dtype  # noqa: E402

__all__ += ["resolve_device_dtype"]
