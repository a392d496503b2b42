"""Uptraining converted checkpoints: per-layer attention transfer, then end-to-end LM / distillation training.

Public API::

    from hf_attn_swap.train import UptrainConfig, uptrain, layerwise_transfer, UptrainTrainer, select_trainable
    from hf_attn_swap.train.pretrain import PretrainConfig, pretrain   # a small MHA decoder trained here
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
    "PretrainConfig": "pretrain",
    "PretrainResult": "pretrain",
    "log_gap_recovery": "pipeline",
    "train_end_to_end": "pipeline",
    "uptrain": "pipeline",
    "DomainsError": "domains",
    "run_domains": "domains",
    "GENERATED": "mix",
    "check_sources": "mix",
    "recall_blocks": "mix",
    "teacher_samples": "mix",
    "PreparedData": "pipeline",
    "prepare_data": "pipeline",
    "BlockDataset": "trainer",
    "StopAfterSeconds": "trainer",
    "UptrainTrainer": "trainer",
    "select_trainable": "trainer",
    "trainable_names": "trainer",
}


from .._lazy import lazy_exports  # noqa: E402

__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)


__all__ = [
    "BlockDataset",
    "DomainsError",
    "GENERATED",
    "LAYERWISE_TRAINABLE",
    "LayerStat",
    "LayerwiseResult",
    "PRETRAIN_TOKENS",
    "PreparedData",
    "PretrainConfig",
    "PretrainResult",
    "StopAfterSeconds",
    "TRAINABLE",
    "UptrainConfig",
    "UptrainResult",
    "UptrainTrainer",
    "attention_mse",
    "capture_attention_outputs",
    "check_sources",
    "check_teacher",
    "distill_kl",
    "layerwise_transfer",
    "lm_loss",
    "log_gap_recovery",
    "prepare_data",
    "recall_blocks",
    "run_domains",
    "select_trainable",
    "teacher_samples",
    "train_end_to_end",
    "trainable_names",
    "uptrain",
]
