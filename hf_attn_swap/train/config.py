"""``UptrainConfig``: every option of an uptraining run, typed, validated, and saved as sorted JSON or YAML.

Unknown keys are dropped with a warning when loading (so configs written by a newer version still load), and every
value is checked in ``__post_init__`` with an error that names what is allowed, before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: what end-to-end training may update.
TRAINABLE = ("all", "attention", "kv", "feature_map", "lora")
#: what the per-layer stage may update inside each attention module.
LAYERWISE_TRAINABLE = ("attention", "kv", "feature_map")
#: pre-training tokens of known checkpoints, for budgets given as alpha (a fraction of them).
PRETRAIN_TOKENS: dict[str, int] = {
    "smollm2-135m": 2_000_000_000_000,  # SmolLM2 paper: 135M trained on 2T tokens
}


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class UptrainConfig:
    """Options of :func:`hf_attn_swap.train.uptrain` and ``hf-attn-swap uptrain``.

    Two stages, either may be off: (1) per-layer attention-output matching on the teacher's hidden states
    (``layerwise_tokens > 0``), then (2) end-to-end training with the HF ``Trainer`` on a weighted sum of objectives.
    """

    # ---- what to train on
    model: str = field(default="smollm2-135m", metadata=_help("short name or local directory of the original model"))
    variant: str = field(default="mqa", metadata=_help("attention variant to convert to (see hf-attn-swap variants)"))
    variant_options: dict[str, Any] = field(default_factory=lambda: {"strategy": "fit"},
                                            metadata=_help("options of the variant, e.g. {strategy: fit}"))
    plan: dict[str, Any] | None = field(default=None, metadata=_help(
        "per-layer plan instead of variant: {layers: variant name or [name, {options}]}, e.g. "
        "{'0-14': [linear, {feature_map: hedgehog}], '15-': [sliding_window, {window: 64}]}"))
    conversion_tokens: int = field(default=4096, metadata=_help("calibration tokens for conversions that calibrate"))
    corpus: str = field(default="shakespeare", metadata=_help("training text: a corpus name, .txt file or directory"))
    eval_corpus: str | None = field(default=None, metadata=_help("held-out text (default: validation split of corpus)"))
    eval_windows: int = field(default=8, metadata=_help("held-out windows of eval_context tokens (0 = no evaluation)"))
    eval_context: int = field(default=512, metadata=_help("tokens per held-out window"))

    # ---- stage 1: per-layer attention-output matching
    layerwise_tokens: int = field(default=16384, metadata=_help("calibration tokens for the per-layer stage (0 = skip)"))
    layerwise_steps: int = field(default=100, metadata=_help("Adam steps per layer"))
    layerwise_lr: float = field(default=1e-3, metadata=_help("peak learning rate of the per-layer stage"))
    layerwise_trainable: str = field(default="attention", metadata=_help(f"one of {LAYERWISE_TRAINABLE}"))
    layerwise_rows: int = field(default=4, metadata=_help("rows of block_size tokens per per-layer step"))

    # ---- stage 2: end-to-end
    lm_weight: float = field(default=0.0, metadata=_help("weight of the language-model loss"))
    kl_weight: float = field(default=1.0, metadata=_help("weight of the logit-distillation KL to the teacher"))
    attn_weight: float = field(default=0.0, metadata=_help("weight of the per-layer attention-output MSE to the teacher"))
    temperature: float = field(default=1.0, metadata=_help("softmax temperature of the distillation KL"))
    trainable: str = field(default="attention", metadata=_help(f"one of {TRAINABLE}"))
    lora_r: int = field(default=8, metadata=_help("LoRA rank (trainable=lora)"))
    lora_alpha: float = field(default=16.0, metadata=_help("LoRA alpha (trainable=lora)"))
    tokens: int | None = field(default=16384, metadata=_help("end-to-end budget in training tokens (0 = skip stage)"))
    alpha: float | None = field(default=None, metadata=_help("budget as a fraction of the original pre-training tokens"))
    pretrain_tokens: int | None = field(default=None, metadata=_help("pre-training tokens of the model (for alpha)"))
    block_size: int = field(default=256, metadata=_help("tokens per training sequence"))
    batch_size: int = field(default=4, metadata=_help("sequences per device per step"))
    grad_accum: int = field(default=1, metadata=_help("gradient accumulation steps"))
    lr: float = field(default=5e-5, metadata=_help("peak learning rate of the end-to-end stage"))
    warmup_ratio: float = field(default=0.05, metadata=_help("linear warm-up share of the steps"))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay"))
    max_grad_norm: float = field(default=1.0, metadata=_help("gradient clipping"))
    max_seconds: float | None = field(default=None, metadata=_help("stop the end-to-end stage after this wall time"))

    # ---- bookkeeping
    output_dir: str = field(default="uptrain_out", metadata=_help("checkpoints and the final model go here"))
    save_steps: int = field(default=50, metadata=_help("checkpoint every N optimizer steps"))
    save_total_limit: int | None = field(default=2, metadata=_help("keep at most this many checkpoints"))
    logging_steps: int = field(default=5, metadata=_help("log the loss every N steps"))
    seed: int = field(default=0, metadata=_help("seed of data order and initialisation"))
    threads: int | None = field(default=None, metadata=_help("torch CPU threads (None = torch's default)"))
    device: str = field(default="cpu", metadata=_help("where the student, the teacher and every batch run: cpu, cuda, "
                                                      "cuda:N, mps"))
    dtype: str = field(default="float32", metadata=_help("parameter dtype of student and teacher: float32 or bfloat16"))
    progress: bool = field(default=True, metadata=_help("progress bars"))

    def __post_init__(self) -> None:
        for f in fields(self):  # YAML 1.1 reads "1e-3" as a string: coerce numbers written that way
            v = getattr(self, f.name)
            if isinstance(v, str) and "float" in str(f.type):
                try:
                    setattr(self, f.name, float(v))
                except ValueError:
                    pass

        def positive(name: str, allow_zero: bool = False) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (v == 0 and not allow_zero):
                raise ValueError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} number, got {v!r}")

        for name in ("layerwise_steps", "layerwise_lr", "layerwise_rows", "temperature", "lora_r", "lora_alpha",
                     "block_size", "batch_size", "grad_accum", "lr", "save_steps", "logging_steps", "eval_context"):
            positive(name)
        for name in ("conversion_tokens", "layerwise_tokens", "lm_weight", "kl_weight", "attn_weight", "weight_decay",
                     "max_grad_norm", "warmup_ratio", "eval_windows"):
            positive(name, allow_zero=True)
        if self.warmup_ratio >= 1:
            raise ValueError(f"warmup_ratio is a share of the steps in [0, 1), got {self.warmup_ratio!r}")
        if self.trainable not in TRAINABLE:
            raise ValueError(f"unknown trainable {self.trainable!r}; allowed: {', '.join(TRAINABLE)}")
        if self.layerwise_trainable not in LAYERWISE_TRAINABLE:
            raise ValueError(
                f"unknown layerwise_trainable {self.layerwise_trainable!r}; allowed: {', '.join(LAYERWISE_TRAINABLE)}"
            )
        if self.tokens is not None and self.alpha is not None:
            raise ValueError("give the budget either as tokens or as alpha, not both")
        if self.tokens is not None:
            positive("tokens", allow_zero=True)
        if self.alpha is not None:
            if not 0 < self.alpha <= 1:
                raise ValueError(f"alpha must be a fraction in (0, 1] of the pre-training tokens, got {self.alpha!r}")
        if self.tokens is None and self.alpha is None:
            raise ValueError("give a budget: tokens (0 skips the end-to-end stage) or alpha")
        if not self.end_to_end and self.layerwise_tokens == 0:
            raise ValueError("nothing to train: layerwise_tokens and the end-to-end budget (tokens/alpha) are both 0")
        if self.end_to_end and self.lm_weight + self.kl_weight + self.attn_weight == 0:
            raise ValueError("all objective weights are 0: set lm_weight, kl_weight or attn_weight")
        if not isinstance(self.variant_options, dict):
            raise ValueError(f"variant_options must be a mapping, got {type(self.variant_options).__name__}")
        if self.plan is not None and (not isinstance(self.plan, dict) or not self.plan):
            raise ValueError("plan must be a non-empty mapping {layers: variant or [variant, {options}]}")
        if self.max_seconds is not None:
            positive("max_seconds")
        from ..devices import dtype_name, resolve_dtype

        self.dtype = dtype_name(resolve_dtype(self.dtype))  # unknown names: one line listing the allowed ones
        if self.dtype == "float16":
            raise ValueError("dtype=float16 cannot train here: pure float16 weights need loss scaling and float32 "
                             "master weights, which uptrain does not do (its gradients underflow); allowed: float32, "
                             "bfloat16")
        if not isinstance(self.device, str) or not self.device:
            raise ValueError(f"device must be a device name (cpu, cuda, cuda:N, mps), got {self.device!r}")

    def swap_spec(self) -> tuple[Any, dict[str, Any]]:
        """``(variant, options)`` as :func:`hf_attn_swap.swap_attention` takes them (a plan: options empty)."""
        if self.plan is None:
            return self.variant, dict(self.variant_options)
        plan = {str(k): (tuple(v) if isinstance(v, list) else v) for k, v in self.plan.items()}
        return plan, {}

    @property
    def end_to_end(self) -> bool:
        """Whether the end-to-end stage runs (a positive token budget, or an alpha)."""
        return self.alpha is not None or bool(self.tokens)

    def budget_tokens(self) -> int:
        """The end-to-end budget in tokens, resolving ``alpha`` against the known pre-training size.

        Raises:
            ValueError: ``alpha`` given for a model whose pre-training size is unknown.
        """
        if self.alpha is None:
            return int(self.tokens or 0)
        pre = self.pretrain_tokens or PRETRAIN_TOKENS.get(self.model)
        if not pre:
            raise ValueError(
                f"alpha needs the pre-training size of {self.model!r}; set pretrain_tokens (known: "
                f"{', '.join(f'{k}={v:.3g}' for k, v in PRETRAIN_TOKENS.items())}) or give tokens instead"
            )
        return int(round(self.alpha * pre))

    # ---- serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UptrainConfig:
        """Build from a dict; unknown keys are dropped with a warning naming the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            logger.warning("ignoring unknown uptrain option(s) %s; known: %s", unknown, ", ".join(sorted(known)))
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def load(cls, path: str | Path) -> UptrainConfig:
        """Read a ``.json`` or ``.yaml``/``.yml`` file."""
        path = Path(path)
        text = path.read_text(encoding="utf-8")
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: an uptrain config must be a mapping of options")
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.write_text(self.to_yaml() if path.suffix in (".yaml", ".yml") else self.to_json(), encoding="utf-8")

    def override(self, items: list[str]) -> UptrainConfig:
        """Apply ``key=value`` overrides (values parsed as YAML: ``lr=1e-4``, ``tokens=null``)."""
        import yaml

        data = self.to_dict()
        known = set(data)
        for item in items:
            if "=" not in item:
                raise ValueError(f"override {item!r} is not key=value")
            key, value = item.split("=", 1)
            if key not in known:
                raise ValueError(f"unknown uptrain option {key!r}; known: {', '.join(sorted(known))}")
            parsed = yaml.safe_load(value)
            if isinstance(parsed, str):  # YAML 1.1 reads "1e-3" as a string
                try:
                    parsed = float(parsed)
                except ValueError:
                    pass
            data[key] = parsed
        return type(self)(**data)
