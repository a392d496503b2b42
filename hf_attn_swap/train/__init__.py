"""Uptraining converted checkpoints: per-layer attention transfer, then end-to-end LM / distillation training.

Public API::

    from hf_attn_swap.train import UptrainConfig, uptrain, layerwise_transfer, UptrainTrainer, select_trainable
"""

from .config import LAYERWISE_TRAINABLE, PRETRAIN_TOKENS, TRAINABLE, UptrainConfig
from .layerwise import LayerStat, LayerwiseResult, layerwise_transfer
from .objectives import attention_mse, capture_attention_outputs, check_teacher, distill_kl, lm_loss
from .pipeline import UptrainResult, log_gap_recovery, train_end_to_end, uptrain
from .trainer import BlockDataset, StopAfterSeconds, UptrainTrainer, select_trainable, trainable_names

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
