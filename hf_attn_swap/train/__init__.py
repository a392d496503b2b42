"""Uptraining converted checkpoints: per-layer attention transfer, then end-to-end LM / distillation training.

Public API::

    from hf_attn_swap.train import UptrainConfig, uptrain, layerwise_transfer, UptrainTrainer, select_trainable
"""

# Submodules load on first use (PEP 562): ``hf_attn_swap.train.config`` must import without torch, so that
# ``hf-attn-swap uptrain --help`` answers in well under a second.
_EXPORTS = {
    "LAYERWISE_TRAINABLE": "config",
    "PRETRAIN_TOKENS": "config",
    "TRAINABLE": "config",
    "UptrainConfig": "config",
    "LayerStat": "layerwise",
    "LayerwiseResult": "layerwise",
    "layerwise_transfer": "layerwise",
    "attention_mse": "objectives",
    "capture_attention_outputs": "objectives",
    "check_teacher": "objectives",
    "distill_kl": "objectives",
    "lm_loss": "objectives",
    "UptrainResult": "pipeline",
    "log_gap_recovery": "pipeline",
    "train_end_to_end": "pipeline",
    "uptrain": "pipeline",
    "BlockDataset": "trainer",
    "StopAfterSeconds": "trainer",
    "UptrainTrainer": "trainer",
    "select_trainable": "trainer",
    "trainable_names": "trainer",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = [
    "BlockDataset",
    "LAYERWISE_TRAINABLE",
    "LayerStat",
    "LayerwiseResult",
    "PRETRAIN_TOKENS",
    "StopAfterSeconds",
    "TRAINABLE",
    "UptrainConfig",
    "UptrainResult",
    "UptrainTrainer",
    "attention_mse",
    "capture_attention_outputs",
    "check_teacher",
    "distill_kl",
    "layerwise_transfer",
    "lm_loss",
    "log_gap_recovery",
    "select_trainable",
    "train_end_to_end",
    "trainable_names",
    "uptrain",
]
