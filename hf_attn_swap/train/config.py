"""``UptrainConfig``: every option of an uptraining run, typed, validated, and saved as sorted JSON or YAML.

Built on :mod:`hf_attn_swap.cliconfig` like every other command's config: unknown keys are refused with the closest
valid name (a misspelt ``kl_wieght: 2`` must not train on the defaults), ``key=value`` overrides are parsed by each
field's type, and every value is checked in ``__post_init__`` with an error that names what is allowed, before
anything is written. Importing this module does not import torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import cliconfig
from ..cliconfig import ConfigError, check_fields, opt

#: what end-to-end training may update.
TRAINABLE = ("all", "attention", "kv", "feature_map", "lora")
#: what the per-layer stage may update inside each attention module.
LAYERWISE_TRAINABLE = ("attention", "kv", "feature_map", "block")
#: pre-training tokens of known checkpoints, for budgets given as alpha (a fraction of them).
PRETRAIN_TOKENS: dict[str, int] = {
    "smollm2-135m": 2_000_000_000_000,  # SmolLM2 paper: 135M trained on 2T tokens
}


@dataclass
class UptrainConfig:
    """Options of :func:`hf_attn_swap.train.uptrain` and ``hf-attn-swap uptrain``.

    Two stages, either may be off: (1) per-layer attention-output matching on the teacher's hidden states
    (``layerwise_tokens > 0``), then (2) end-to-end training with the HF ``Trainer`` on a weighted sum of objectives.
    """

    # ---- what to train on
    model: str = opt("smollm2-135m", help="short name or local directory of the original model")
    variant: str = opt("mqa", help="attention variant to convert to (see hf-attn-swap variants)")
    variant_options: dict[str, Any] = opt(default_factory=lambda: {"strategy": "fit"},
                                          help="options of the variant, e.g. {strategy: fit}")
    plan: dict[str, Any] | None = opt(None, help=(
        "per-layer plan instead of variant: {layers: variant name or [name, {options}]}, e.g. "
        "{'0-14': [linear, {feature_map: hedgehog}], '15-': [sliding_window, {window: 64}]}"))
    conversion_tokens: int = opt(4096, min=0, help="calibration tokens for conversions that calibrate")
    corpus: str = opt("shakespeare", help="training text: a corpus name, .txt file or directory (when mix is unset)")
    mix: dict[str, float] | None = opt(None, help=(
        "training text as {source: share}: corpus names, .txt paths, 'teacher' (text sampled from the teacher) and "
        "'recall' (generated key-value recall over real text); every stage gets each source's share"))
    held_out: list[str] = opt(default_factory=list, allow_empty=True, help=(
        "corpora never trained on, evaluated per domain; the first is the headline (leave-one-domain-out)"))
    eval_domains: list[str] | None = opt(None, help=(
        "corpora evaluated one by one after every stage (default: the mix's corpora and the held-out ones)"))
    eval_corpus: str | None = opt(None, help=(
        "headline held-out text (default: the first held_out corpus, else the validation split of corpus)"))
    eval_windows: int = opt(8, min=0, help="held-out windows of eval_context tokens (0 = no evaluation)")
    eval_context: int = opt(512, min=1, help="tokens per held-out window")
    passkey_lengths: list[int] = opt(default_factory=list, min=16, allow_empty=True, help=(
        "passkey probe lengths measured after every stage (plain format, depths 0/0.5/1; empty = no probe)"))
    passkey_trials: int = opt(3, min=1, help="pass keys per (length, depth) cell")

    # ---- stage 1: per-layer attention-output matching
    layerwise_tokens: int = opt(16384, min=0, help="calibration tokens for the per-layer stage (0 = skip)")
    layerwise_steps: int = opt(100, min=1, help="Adam steps per layer")
    layerwise_lr: float = opt(1e-3, gt=0, help="peak learning rate of the per-layer stage")
    layerwise_trainable: str = opt("attention", choices=LAYERWISE_TRAINABLE, help=(
        "what the per-layer stage trains: the attention module (all of it, kv or feature_map) or its whole decoder "
        "layer (block)"))
    layerwise_rows: int = opt(4, min=1, help="rows of block_size tokens per per-layer step")
    layerwise_inputs: str = opt("teacher", choices=("teacher", "student"), help=(
        "what the per-layer stage trains each attention module on: the teacher module's inputs (layers independent) "
        "or the student's own hidden states, layer by layer in order (each layer also corrects the earlier ones; "
        "one process)"))

    # ---- stage 2: end-to-end
    lm_weight: float = opt(0.0, min=0, help="weight of the language-model loss")
    kl_weight: float = opt(1.0, min=0, help="weight of the logit-distillation KL to the teacher")
    attn_weight: float = opt(0.0, min=0, help="weight of the per-layer attention-output MSE to the teacher")
    temperature: float = opt(1.0, gt=0, help="softmax temperature of the distillation KL")
    trainable: str = opt("attention", choices=TRAINABLE, help="what the end-to-end stage trains")
    lora_r: int = opt(8, min=1, help="LoRA rank (trainable=lora)")
    lora_alpha: float = opt(16.0, gt=0, help="LoRA alpha (trainable=lora)")
    tokens: int | None = opt(16384, min=0, help="end-to-end budget in training tokens (0 = skip stage)")
    alpha: float | None = opt(None, gt=0, max=1, help="budget as a fraction of the original pre-training tokens")
    pretrain_tokens: int | None = opt(None, min=1, help="pre-training tokens of the model (for alpha)")
    block_size: int = opt(256, min=1, help="tokens per training sequence")
    batch_size: int = opt(4, min=1, help="sequences per device per step")
    grad_accum: int = opt(1, min=1, help="gradient accumulation steps")
    lr: float = opt(5e-5, gt=0, help="peak learning rate of the end-to-end stage")
    warmup_ratio: float = opt(0.05, min=0, help="linear warm-up share of the steps")
    weight_decay: float = opt(0.0, min=0, help="AdamW weight decay")
    max_grad_norm: float = opt(1.0, min=0, help="gradient clipping")
    max_seconds: float | None = opt(None, gt=0, help="stop the end-to-end stage after this wall time")

    # ---- bookkeeping
    output_dir: str = opt("uptrain_out", help="checkpoints and the final model go here")
    overwrite: bool = opt(False, help="allow starting a new run in an output_dir that already holds one")
    save_steps: int = opt(50, min=1, help="checkpoint every N optimizer steps")
    save_total_limit: int | None = opt(2, min=1, help="keep at most this many checkpoints")
    logging_steps: int = opt(5, min=1, help="log the loss every N steps")
    seed: int = opt(0, help="seed of data order and initialisation")
    threads: int | None = opt(1, min=1, help=(
        "torch CPU threads (1: on a busy 2-core machine two threads stall on small matmuls; raise it on an idle or "
        "larger machine; null = torch's default)"))
    device: str = opt("auto", help=(
        "where the student, the teacher and every batch run: auto (the GPU when there is one, else cpu), cpu, cuda, "
        "cuda:N, mps"))
    dtype: str = opt("float32", help=(
        "parameter dtype of student and teacher: float32 or bfloat16 (bf16); float16 is refused (loss scaling)"))
    mixed_precision: str = opt("no", help=(
        "bf16: both stages run their matrix products in bfloat16 under torch.autocast, weights and optimizer state "
        "stay float32 (4-8x faster products on a CPU with AMX/AVX512-BF16); no: float32 throughout; evaluation is "
        "always float32"))
    progress: bool = opt(True, help="progress bars")

    def __post_init__(self) -> None:
        from .precision import check_mixed_precision

        check_fields(self)  # types, choices and bounds declared on the fields above
        check_mixed_precision(self.mixed_precision)
        if self.warmup_ratio >= 1:
            raise ConfigError(f"warmup_ratio is a share of the steps in [0, 1), got {self.warmup_ratio!r}")
        if self.tokens is not None and self.alpha is not None:
            raise ConfigError("give the budget either as tokens or as alpha, not both")
        if self.tokens is None and self.alpha is None:
            raise ConfigError("give a budget: tokens (0 skips the end-to-end stage) or alpha")
        if not self.end_to_end and self.layerwise_tokens == 0:
            raise ConfigError("nothing to train: layerwise_tokens and the end-to-end budget (tokens/alpha) are both 0")
        if self.end_to_end and self.lm_weight + self.kl_weight + self.attn_weight == 0:
            raise ConfigError("all objective weights are 0: set lm_weight, kl_weight or attn_weight")
        if self.mix is not None:
            if not self.mix:
                raise ConfigError("mix must name at least one source {source: share}; or leave it unset to train on "
                                  "corpus")
            bad = {k: v for k, v in self.mix.items() if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0}
            if bad:
                raise ConfigError(f"every share in mix must be a positive number, got {bad}")
        if self.mix and "recall" in self.mix and self.block_size < 128:
            raise ConfigError(f"recall rows need block_size >= 128 to hold their facts and filler, got {self.block_size}")
        trained = set(self.mix) if self.mix else {self.corpus}
        both = sorted(trained & set(self.held_out))
        if both:
            raise ConfigError(f"{', '.join(both)} is both trained on and held out: a held-out domain must never enter "
                              "the training text; remove it from held_out or from the mix/corpus")
        if self.layerwise_tokens and self.layerwise_trainable == "block" and self.layerwise_inputs != "teacher":
            raise ConfigError("layerwise_trainable='block' trains each decoder layer on the teacher's inputs: set "
                              "layerwise_inputs='teacher' (or layerwise_trainable='attention' for the student's own)")
        if self.layerwise_tokens and self.layerwise_tokens < self.block_size * self.layerwise_rows:
            raise ConfigError(f"layerwise_tokens={self.layerwise_tokens} is less than one per-layer step "
                              f"(layerwise_rows * block_size = {self.layerwise_rows * self.block_size}); raise it or set "
                              "0 to skip the stage")
        step = self.block_size * self.batch_size * self.grad_accum
        if self.tokens and self.tokens < step:
            raise ConfigError(f"tokens={self.tokens} is less than one end-to-end step (block_size * batch_size * "
                              f"grad_accum = {step}); raise it or set 0 to skip the stage")
        if self.plan is not None and not self.plan:
            raise ConfigError("plan must be a non-empty mapping {layers: variant or [variant, {options}]}")
        # Names only (torch-free, like the rest of this module); devices.resolve probes the dtype before loading.
        dtypes, aliases = ("float32", "bfloat16", "float16"), {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16",
                                                              "half": "float16"}
        self.dtype = aliases.get(self.dtype, self.dtype)
        if self.dtype not in dtypes:
            allowed = ", ".join([*dtypes, *(f"{a} (= {b})" for a, b in aliases.items())])
            raise ConfigError(f"unknown dtype {self.dtype!r}; allowed: {allowed}")
        if self.dtype == "float16":
            raise ConfigError("dtype=float16 cannot train here: pure float16 weights need loss scaling and float32 "
                              "master weights, which uptrain does not do (its gradients underflow); allowed: float32, "
                              "bfloat16")
        if not self.device:
            raise ConfigError("device must be a device name (cpu, cuda, cuda:N, mps), got ''")

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
        return cliconfig.to_dict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UptrainConfig:
        """Build from a dict; an unknown key raises :class:`~hf_attn_swap.cliconfig.ConfigError` with the closest
        valid name."""
        return cliconfig.from_dict(cls, data)

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | None = None) -> UptrainConfig:
        """Read a ``.json`` or ``.yaml``/``.yml`` file (the ``config.yaml``/``uptrain_result.json`` ``config`` of a
        run too), then apply ``key=value`` overrides."""
        return cliconfig.load(cls, path, overrides or [])

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.write_text(self.to_yaml() if path.suffix in (".yaml", ".yml") else self.to_json(), encoding="utf-8")

    def override(self, items: list[str]) -> UptrainConfig:
        """Apply ``key=value`` overrides, each parsed by the field's type (``lr=1e-4`` is a float, ``tokens=null``
        is None, ``variant_options.strategy=mean`` sets one option)."""
        return cliconfig.from_dict(type(self), cliconfig.apply_overrides(type(self), self.to_dict(), items))
