"""A roofline model of decode and prefill for every attention variant, and hardware profiles to apply it to.

From a decoder's shapes (its config) and a variant, :func:`decode_cost` and :func:`prefill_cost` count the bytes a
step must move and the FLOPs it must do; a hardware profile turns them into a time: ``max(bytes / bandwidth,
flops / flop_rate)`` of the matrices (weights) plus the same of the attention (cache or state), the two phases
running one after the other. What is counted (``e`` = bytes per weight/KV element, ``b`` = batch,
``c`` = tokens already cached, ``L`` layers, ``H``/``H_kv`` query/KV heads, ``d`` head size):

* weights: every matrix of every layer, the norms, the final norm and the LM head (the embedding matrix again when
  tied), read once per step; plus the ``b`` embedding rows gathered. FLOPs ``2 * b * (matmul parameters)``.
* full attention (baseline, gqa, mqa): the ``c`` cached keys and values read once per KV head, as a grouped kernel
  reads them (no ``repeat_kv`` copy), the new token's K/V written (``2 b H_kv d e`` per layer); FLOPs
  ``4 b H (c + 1) d`` per layer (scores and weighted sum).
* sliding window ``W`` with ``S`` sinks: the same over the ``min(c, S + W - 1)`` kept tokens (a ring buffer: one
  token written per step).
* linear: the fp32 state ``S (b, H_kv, m, d)`` and ``z (b, H_kv, m)`` read and written back; FLOPs
  ``2 b H m (d + 1)`` to read it and ``2 b H_kv m (d + 1)`` to add the new key (feature maps not counted).
* hybrid (linear with a softmax window ``W``): the window's ``W - 1`` keys/values as a sliding window, plus the
  linear state.

Activations are not counted (a few rows of ``hidden`` per token); nor is any copy an implementation adds (a
``torch.cat`` growing the cache, a ``repeat_kv``): that is the point, the measured path is compared with what the
arithmetic and the memory traffic require. Hardware profiles of three GPUs come from the vendors' datasheets; the CPU
profile is measured here (:func:`measure_cpu`).
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

logger = logging.getLogger(__name__)

#: decoders with the Llama layout (q/k/v/o projections, gated MLP of three matrices, RMSNorm) the model counts.
SUPPORTED_MODEL_TYPES = (
    "llama", "mistral", "qwen2", "qwen3", "smollm3", "granite", "olmo2", "gemma", "gemma2", "gemma3_text", "cohere",
)

#: configs of published models, written in this repository (``model_configs/<name>.json``).
PUBLISHED_MODELS = ("llama-2-7b", "llama-3-8b", "llama-3-70b")
_CONFIG_DIR = Path(__file__).with_name("model_configs")

DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
STATE_BYTES = 4  # linear-attention states are kept in fp32 whatever the model dtype (cache_layers.LinearStateLayer)
PLAN_VARIANTS = ("baseline", "gqa", "mqa", "sliding_window", "linear", "hybrid")
HYBRID_DEFAULT_WINDOW = 64


# ---------------------------------------------------------------------------------------------------------------------
# shapes and variants
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """What the cost model needs of a decoder's config."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _load_config_dict(config: Any) -> tuple[dict[str, Any], str]:
    if isinstance(config, Mapping):
        return dict(config), str(config.get("_name_or_path") or config.get("model_type") or "model")
    if hasattr(config, "to_dict") and hasattr(config, "model_type"):
        return config.to_dict(), str(getattr(config, "name_or_path", "") or config.model_type)
    text = str(config)
    if text in PUBLISHED_MODELS:
        path = _CONFIG_DIR / f"{text}.json"
    else:
        path = Path(text)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"model config {text!r} is neither a config.json (or a folder with one) nor a published "
                             f"model; allowed names: {', '.join(PUBLISHED_MODELS)}")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read model config {path}: {err}") from None
    return data, text if text in PUBLISHED_MODELS else path.parent.name or path.stem


def model_shape(config: Any) -> ModelShape:
    """The shapes of a decoder from its config.

    Args:
        config: a transformers config, a dict, a path to a ``config.json`` (or its folder), or the name of a published
            model (:data:`PUBLISHED_MODELS`).

    Raises:
        ValueError: unreadable, or not a decoder this model counts (:data:`SUPPORTED_MODEL_TYPES`).
    """
    data, name = _load_config_dict(config)
    data = data.get("text_config") or data  # multimodal wrappers keep the decoder here
    mt = data.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type {mt!r} is not a decoder the roofline model supports; allowed: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    try:
        heads = int(data["num_attention_heads"])
        hidden = int(data["hidden_size"])
        shape = ModelShape(
            name=name,
            layers=int(data["num_hidden_layers"]),
            hidden=hidden,
            heads=heads,
            kv_heads=int(data.get("num_key_value_heads") or heads),
            head_dim=int(data.get("head_dim") or hidden // heads),
            intermediate=int(data["intermediate_size"]),
            vocab=int(data["vocab_size"]),
            tied=bool(data.get("tie_word_embeddings", False)),
        )
    except KeyError as err:
        raise ValueError(f"model config {name!r} lacks {err.args[0]!r}, which the roofline model needs") from None
    return shape


@dataclass(frozen=True)
class VariantShape:
    """What one variant keeps per layer: ``kind`` is ``full``, ``window``, ``linear`` or ``hybrid``."""

    label: str
    kind: str
    kv_heads: int
    window: int = 0
    sinks: int = 0
    features: int = 0  # m, the feature size of linear attention


def _int_opt(opts: dict[str, Any], key: str, default: int, lo: int, what: str) -> int:
    v = opts.pop(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{what}: {key} must be an integer >= {lo}, got {v!r}")
    return v


def resolve_variant(shape: ModelShape, name: str, options: Mapping[str, Any] | None = None) -> VariantShape:
    """The per-layer shape a variant gives ``shape``'s model.

    Names: ``baseline``, ``gqa:groups=N`` (N KV heads), ``mqa``, ``sliding_window:window=W[,sinks=S]``,
    ``linear[:num_features=m,feature_map=...]`` (``window=W`` makes it the hybrid), ``hybrid[:window=W]``.
    Other options of the real variants (strategies, seeds) do not change the cost and are accepted.
    """
    from ..specs import format_variant

    opts = dict(options or {})
    label = format_variant(name, dict(opts))
    d = shape.head_dim
    if name == "baseline":
        return VariantShape(label, "full", shape.kv_heads)
    if name in ("gqa", "mqa"):
        g = 1 if name == "mqa" else _int_opt(opts, "groups", 1, 1, label)
        if g > shape.kv_heads or shape.kv_heads % g or shape.heads % g:
            raise ValueError(f"{label}: groups={g} must divide the model's {shape.kv_heads} KV heads and "
                             f"{shape.heads} query heads")
        return VariantShape(label, "full", g)
    if name == "sliding_window":
        w = _int_opt(opts, "window", 4096, 1, label)
        s = _int_opt(opts, "sinks", 0, 0, label)
        if s >= w:
            raise ValueError(f"{label}: sinks must be smaller than window")
        return VariantShape(label, "window", shape.kv_heads, window=w, sinks=s)
    if name in ("linear", "hybrid"):
        fmap = opts.get("feature_map", "elu")
        nf = _int_opt(opts, "num_features", 0, 0, label) or d
        m = {"elu": d, "relu": d, "taylor": 1 + d + d * d, "performer": nf, "hedgehog": 2 * nf}.get(fmap)
        if m is None:
            raise ValueError(f"{label}: feature_map must be one of elu, relu, taylor, performer, hedgehog")
        default_w = HYBRID_DEFAULT_WINDOW if name == "hybrid" else 0
        w = _int_opt(opts, "window", default_w, 1 if name == "hybrid" else 0, label)
        return VariantShape(label, "hybrid" if w else "linear", shape.kv_heads, window=w, features=m)
    raise ValueError(f"unknown variant {name!r} for the roofline model; allowed: {', '.join(PLAN_VARIANTS)}")


def parse_variants(shape: ModelShape, text: str | Sequence[str]) -> list[VariantShape]:
    """:func:`resolve_variant` for every spec of a comma-separated list (or a list of specs)."""
    from ..specs import parse_variant_list

    specs = parse_variant_list(text if isinstance(text, str) else ",".join(text))
    return [resolve_variant(shape, n, o) for n, o in specs]


# ---------------------------------------------------------------------------------------------------------------------
# costs
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cost:
    """Bytes moved and FLOPs of one step (decode) or one forward (prefill).

    ``flops`` is the total; ``attention_flops`` the part spent on the cache or state (scores, weighted sums, linear
    state reads and updates), the rest is the matrices'. The two phases run one after the other (different kernels),
    so a machine's time is the sum of their two rooflines (:meth:`Hardware.time_s`).
    """

    weight_bytes: int
    cache_read_bytes: int
    cache_write_bytes: int
    flops: int
    attention_flops: int = 0

    @property
    def bytes(self) -> int:
        return self.weight_bytes + self.cache_read_bytes + self.cache_write_bytes

    @property
    def cache_bytes(self) -> int:
        return self.cache_read_bytes + self.cache_write_bytes

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "bytes": self.bytes}


def matmul_params(shape: ModelShape, v: VariantShape) -> int:
    """Parameters of the matrices a token goes through (all layers and the LM head; K/V projections at the
    variant's KV heads)."""
    h, d = shape.hidden, shape.head_dim
    per_layer = h * shape.heads * d * 2 + 2 * h * v.kv_heads * d + 3 * h * shape.intermediate
    return shape.layers * per_layer + shape.vocab * h


def weight_bytes(shape: ModelShape, v: VariantShape, dtype_bytes: int) -> int:
    """Bytes of every weight a decode step reads: matrices, norms (two per layer and the final one)."""
    norms = (2 * shape.layers + 1) * shape.hidden
    return (matmul_params(shape, v) + norms) * dtype_bytes


def stored_weight_bytes(shape: ModelShape, v: VariantShape, dtype_bytes: int) -> int:
    """Bytes the weights occupy in memory: :func:`weight_bytes` plus the embedding matrix when it is not tied."""
    return weight_bytes(shape, v, dtype_bytes) + (0 if shape.tied else shape.vocab * shape.hidden * dtype_bytes)


def kept_tokens(v: VariantShape, context: int) -> int:
    """Keys/values a layer of ``v`` holds after ``context`` tokens (0 for pure linear attention)."""
    if v.kind == "full":
        return context
    if v.kind == "window":
        return min(context, v.sinks + v.window - 1)
    if v.kind == "hybrid":
        return min(context, v.window - 1)
    return 0


def _state_elems(shape: ModelShape, v: VariantShape) -> int:
    return v.kv_heads * (v.features * shape.head_dim + v.features) if v.kind in ("linear", "hybrid") else 0


def cache_bytes(shape: ModelShape, v: VariantShape, context: int, *, batch: int = 1, dtype_bytes: int = 2) -> int:
    """Bytes the cache of ``batch`` sequences holds after ``context`` tokens (keys/values and fp32 states)."""
    kv = 2 * v.kv_heads * kept_tokens(v, context) * shape.head_dim * dtype_bytes
    return batch * shape.layers * (kv + _state_elems(shape, v) * STATE_BYTES)


def _attended(v: VariantShape, context: int) -> int:
    """Keys the new token's softmax attends to (cached ones plus itself)."""
    if v.kind == "full":
        return context + 1
    if v.kind == "window":
        return min(context + 1, v.sinks + v.window)
    if v.kind == "hybrid":
        return min(context + 1, v.window)
    return 0


def decode_cost(shape: ModelShape, v: VariantShape, context: int, *, batch: int = 1, dtype_bytes: int = 2) -> Cost:
    """Bytes and FLOPs of one decode step of ``batch`` sequences with ``context`` tokens already cached."""
    if context < 0 or batch < 1:
        raise ValueError(f"need context >= 0 and batch >= 1, got context={context}, batch={batch}")
    b, L, d = batch, shape.layers, shape.head_dim
    kv_read = 2 * b * v.kv_heads * kept_tokens(v, context) * d * dtype_bytes
    kv_write = 2 * b * v.kv_heads * d * dtype_bytes if v.kind != "linear" else 0
    state = b * _state_elems(shape, v) * STATE_BYTES
    attn_flops = 4 * b * shape.heads * _attended(v, context) * d
    if v.kind in ("linear", "hybrid"):
        m = v.features
        attn_flops += 2 * b * shape.heads * m * (d + 1) + 2 * b * v.kv_heads * m * (d + 1)
    w = weight_bytes(shape, v, dtype_bytes) + b * shape.hidden * dtype_bytes  # + the embedding rows gathered
    return Cost(
        weight_bytes=w,
        cache_read_bytes=L * (kv_read + state),
        cache_write_bytes=L * (kv_write + state),
        flops=2 * b * matmul_params(shape, v) + L * attn_flops,
        attention_flops=L * attn_flops,
    )


def _causal_pairs(n: int, span: int | None, sinks: int = 0) -> int:
    """Sum over queries ``i < n`` of the keys each attends to (all ``i + 1``, or ``min(i + 1, span)`` plus sinks
    outside the span)."""
    if span is None or span >= n:
        return n * (n + 1) // 2
    inside = span * (span + 1) // 2 + (n - span) * span  # min(i + 1, span)
    extra = sum(min(sinks, i + 1 - span) for i in range(span, n)) if sinks else 0
    return inside + extra


def prefill_cost(shape: ModelShape, v: VariantShape, length: int, *, batch: int = 1, dtype_bytes: int = 2) -> Cost:
    """Bytes and FLOPs of a prefill of ``length`` tokens (logits of the last token only, as ``generate()`` runs it).

    FLOPs: ``2 b n`` per layer matrix parameter, ``2 b`` per LM-head parameter, softmax attention ``4 b H d`` per
    (query, visible key) pair, linear attention ``2 b n (H + H_kv) m (d + 1)`` (state read and update per token; the
    within-chunk quadratic term is not counted). Bytes: the weights once, the cache written once.
    """
    if length < 1 or batch < 1:
        raise ValueError(f"need length >= 1 and batch >= 1, got length={length}, batch={batch}")
    b, n, L, d = batch, length, shape.layers, shape.head_dim
    layer_params = matmul_params(shape, v) - shape.vocab * shape.hidden
    flops = 2 * b * n * layer_params + 2 * b * shape.vocab * shape.hidden
    span = {"full": None, "window": v.window, "hybrid": v.window, "linear": 0}[v.kind]
    pairs = 0 if v.kind == "linear" else _causal_pairs(n, span, v.sinks if v.kind == "window" else 0)
    attn = L * 4 * b * shape.heads * d * pairs
    if v.kind in ("linear", "hybrid"):
        attn += L * 2 * b * n * (shape.heads + v.kv_heads) * v.features * (d + 1)
    return Cost(
        weight_bytes=weight_bytes(shape, v, dtype_bytes) + b * n * shape.hidden * dtype_bytes,
        cache_read_bytes=0,
        cache_write_bytes=cache_bytes(shape, v, n, batch=b, dtype_bytes=dtype_bytes),
        flops=flops + attn,
        attention_flops=attn,
    )


# ---------------------------------------------------------------------------------------------------------------------
# hardware
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hardware:
    """A machine as the roofline sees it.

    Attributes:
        name: e.g. ``H100-SXM``.
        bandwidth: memory bandwidth, bytes/s.
        flops: dense FLOP rate at ``dtype``, FLOP/s.
        memory: memory for weights and cache, bytes.
        dtype: the dtype the FLOP rate is for (weights and KV use it too).
        source: where the figures come from.
    """

    name: str
    bandwidth: float
    flops: float
    memory: float
    dtype: str
    source: str
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def _phases(self, cost: Cost) -> tuple[tuple[float, float], tuple[float, float]]:
        dense = (cost.weight_bytes / self.bandwidth, (cost.flops - cost.attention_flops) / self.flops)
        attn = (cost.cache_bytes / self.bandwidth, cost.attention_flops / self.flops)
        return dense, attn

    def time_s(self, cost: Cost) -> float:
        """Seconds: the roofline of the matrices (weight bytes, their FLOPs) plus that of the attention (cache bytes,
        attention FLOPs), each ``max(bytes / bandwidth, flops / flop rate)``."""
        return sum(max(p) for p in self._phases(cost))

    def bound(self, cost: Cost) -> str:
        """``memory`` or ``compute`` when both phases are; else ``mixed`` (e.g. attention compute-bound on a CPU)."""
        kinds = {"memory" if mem >= fl else "compute" for mem, fl in self._phases(cost) if mem or fl}
        return kinds.pop() if len(kinds) == 1 else "mixed"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_HW_FIELDS = {"name": str, "bandwidth_gb_s": float, "flops_tflops": float, "memory_gb": float, "dtype": str,
              "source": str}


def hardware_from_dict(data: Mapping[str, Any]) -> Hardware:
    """A profile from ``{name, bandwidth_gb_s, flops_tflops, memory_gb, dtype, source}`` (GB = 1e9 bytes).

    Raises:
        ValueError: a field missing, unknown or not a positive number.
    """
    missing = [k for k in _HW_FIELDS if k not in data]
    unknown = [k for k in data if k not in _HW_FIELDS]
    if missing or unknown:
        raise ValueError(f"hardware profile {data.get('name', '?')!r}: missing {missing or 'nothing'}, unknown "
                         f"{unknown or 'nothing'}; required fields: {', '.join(_HW_FIELDS)}")
    for k in ("bandwidth_gb_s", "flops_tflops", "memory_gb"):
        v = data[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"hardware profile {data['name']!r}: {k} must be a positive number, got {v!r}")
    if data["dtype"] not in DTYPE_BYTES:
        raise ValueError(f"hardware profile {data['name']!r}: dtype must be one of {', '.join(DTYPE_BYTES)}")
    return Hardware(name=data["name"], bandwidth=data["bandwidth_gb_s"] * 1e9, flops=data["flops_tflops"] * 1e12,
                    memory=data["memory_gb"] * 1e9, dtype=data["dtype"], source=data["source"])


#: published figures (dense bf16 tensor-core rate, without sparsity).
GPU_PROFILES: dict[str, Hardware] = {
    p.name: p for p in (
        hardware_from_dict({"name": "A100-80GB", "bandwidth_gb_s": 2039, "flops_tflops": 312, "memory_gb": 80,
                            "dtype": "bfloat16", "source": "NVIDIA A100 Tensor Core GPU datasheet (SXM4 80GB: "
                            "2,039 GB/s HBM2e, BF16 312 TFLOPS dense)"}),
        hardware_from_dict({"name": "H100-SXM", "bandwidth_gb_s": 3350, "flops_tflops": 989, "memory_gb": 80,
                            "dtype": "bfloat16", "source": "NVIDIA H100 Tensor Core GPU datasheet (SXM5: 3.35 TB/s "
                            "HBM3, BF16 1,979 TFLOPS with sparsity = 989 dense)"}),
        hardware_from_dict({"name": "H200", "bandwidth_gb_s": 4800, "flops_tflops": 989, "memory_gb": 141,
                            "dtype": "bfloat16", "source": "NVIDIA H200 Tensor Core GPU datasheet (SXM: 4.8 TB/s "
                            "HBM3e, 141 GB, BF16 1,979 TFLOPS with sparsity = 989 dense)"}),
    )
}


def measure_cpu(threads: int | None = 1, *, size_mb: int = 1024, matmul: int = 1024, dtype: str = "float32",
                min_run_time: float = 0.5, rounds: int = 3) -> Hardware:
    """This machine's CPU profile, measured with ``torch.utils.benchmark`` at ``threads`` threads.

    Bandwidth: ``x.sum()`` over a ``size_mb`` tensor (reads only, what a decode step mostly does); the copy rate
    ``y.copy_(x)`` (read + write) is kept in ``extra``. Each is the median of ``rounds`` rounds, the two timed in
    turn in every round, so that a neighbour's burst on a shared machine moves one sample, not the figure; every
    round's rate is kept in ``extra`` (``bandwidth_samples``, ``copy_samples``) to show the spread. FLOP rate: a
    square ``matmul`` of that size. Memory: the memory available now (what a measurement may use).

    The buffer is 1 GiB by default because smaller ones read partly from the last-level cache: on the 2-core VM
    this was built on, 64 MiB read at 22 GB/s, 256 MiB at 9.6-11.8 GB/s from one run to the next, 1-2 GiB at
    11.1-11.8 GB/s. It is capped at an eighth of the memory available (two buffers are allocated). The buffers come
    from torch's allocator, as a step's weights and caches do, so they get the same page size: 4 KiB by default,
    2 MiB with ``THP_MEM_ALLOC_ENABLE=1`` (there the same read ran at ~15 GB/s; results record which,
    :func:`hf_attn_swap.provenance.huge_pages`).
    """
    import psutil
    import torch
    from torch.utils import benchmark

    if rounds < 1:
        raise ValueError(f"measure_cpu: rounds must be >= 1, got {rounds}")
    tdt = getattr(torch, dtype)
    avail = psutil.virtual_memory().available
    size_mb = max(8, min(size_mb, int(avail // 8 // 2**20)))
    n = max(1, size_mb * 2**20 // torch.empty((), dtype=tdt).element_size())
    x = torch.rand(n, dtype=tdt)
    y = torch.empty_like(x)
    a = torch.rand(matmul, matmul, dtype=tdt)
    bmat = torch.rand(matmul, matmul, dtype=tdt)
    nt = threads or torch.get_num_threads()

    def med(stmt: str, env: dict) -> float:
        return benchmark.Timer(stmt, globals=env, num_threads=nt).blocked_autorange(min_run_time=min_run_time).median

    nbytes = x.numel() * x.element_size()
    reads, copies = [], []
    for _ in range(rounds):
        reads.append(nbytes / med("x.sum()", {"x": x}))
        copies.append(2 * nbytes / med("y.copy_(x)", {"x": x, "y": y}))
    del x, y
    t_mm = med("a @ b", {"a": a, "b": bmat})
    return Hardware(
        name="cpu (measured)",
        bandwidth=statistics.median(reads),
        flops=2 * matmul**3 / t_mm,
        memory=float(psutil.virtual_memory().available),
        dtype=dtype,
        source=f"measured here with torch.utils.benchmark at {nt} thread(s): sum of {size_mb} MiB (median of "
               f"{rounds} rounds), {matmul}x{matmul} matmul, {dtype}",
        extra={"copy_bandwidth": statistics.median(copies), "threads": nt, "size_mb": size_mb,
               "bandwidth_samples": reads, "copy_samples": copies},
    )


def get_hardware(name_or_path: str | Mapping[str, Any] | Hardware, *, threads: int | None = 1) -> Hardware:
    """A GPU profile by name (:data:`GPU_PROFILES`), ``cpu`` (measured now), a JSON file or a dict of fields."""
    if isinstance(name_or_path, Hardware):
        return name_or_path
    if isinstance(name_or_path, Mapping):
        return hardware_from_dict(name_or_path)
    if name_or_path in GPU_PROFILES:
        return GPU_PROFILES[name_or_path]
    if name_or_path == "cpu":
        return measure_cpu(threads)
    path = Path(name_or_path)
    if path.suffix == ".json" and path.is_file():
        try:
            return hardware_from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as err:
            raise ValueError(f"hardware profile {path}: not JSON ({err})") from None
    raise ValueError(f"unknown hardware {name_or_path!r}; allowed: {', '.join(GPU_PROFILES)}, cpu, or a JSON file "
                     f"with {', '.join(_HW_FIELDS)}")


# ---------------------------------------------------------------------------------------------------------------------
# predictions and the plan
# ---------------------------------------------------------------------------------------------------------------------


def predict_decode_ms(shape: ModelShape, v: VariantShape, hw: Hardware, context: int, batch: int = 1,
                      dtype_bytes: int | None = None) -> float:
    """Predicted time of one decode step, ms."""
    e = dtype_bytes or DTYPE_BYTES[hw.dtype]
    return hw.time_s(decode_cost(shape, v, context, batch=batch, dtype_bytes=e)) * 1e3


def max_batch(shape: ModelShape, v: VariantShape, hw: Hardware, context: int, dtype_bytes: int | None = None) -> int:
    """Sequences of ``context`` tokens whose cache fits beside the weights (activations not counted)."""
    e = dtype_bytes or DTYPE_BYTES[hw.dtype]
    free = hw.memory - stored_weight_bytes(shape, v, e)
    per_seq = cache_bytes(shape, v, context, dtype_bytes=e)
    if free <= 0:
        return 0
    return int(free // per_seq) if per_seq else 10**9  # no per-sequence cache at all: bounded by activations only


def plan(
    config: Any,
    variants: str | Sequence[str] = "baseline",
    hardware: str | Mapping[str, Any] | Hardware = "H100-SXM",
    *,
    contexts: Iterable[int] = (4096, 8192, 16384, 32768, 65536, 131072),
    batch: int = 1,
    threads: int | None = 1,
    devices: int = 1,
) -> list[dict[str, Any]]:
    """Project decode speed and memory of each variant of a model on a machine.

    Args:
        config: see :func:`model_shape` (e.g. ``"llama-3-70b"`` or a ``config.json``).
        variants: specs, e.g. ``"baseline,gqa:groups=8,sliding_window:window=4096,hybrid:window=64"``.
        hardware: see :func:`get_hardware`.
        contexts: tokens already in the cache.
        batch: sequences decoded together.
        threads: for the measured CPU profile.
        devices: machines sharing the model with ideal tensor parallelism (bandwidth, FLOP rate and memory
            multiplied; communication not counted).

    Returns:
        One row per (variant, context): ``ms_per_step`` (= per-token latency of every sequence), ``tokens_per_s``
        (all sequences), ``cache_bytes_per_seq``, ``max_batch`` (sequences that fit beside the weights), ``bound``.
    """
    shape = model_shape(config)
    hw = get_hardware(hardware, threads=threads)
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ValueError(f"devices must be a positive integer, got {devices!r}")
    if devices > 1:
        hw = replace(hw, name=f"{devices}x {hw.name}", bandwidth=hw.bandwidth * devices, flops=hw.flops * devices,
                     memory=hw.memory * devices)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    vs = parse_variants(shape, variants)
    e = DTYPE_BYTES[hw.dtype]
    rows = []
    for v in vs:
        for c in contexts:
            if int(c) < 1:
                raise ValueError(f"contexts must be positive token counts, got {c}")
            cost = decode_cost(shape, v, int(c), batch=batch, dtype_bytes=e)
            ms = hw.time_s(cost) * 1e3
            rows.append({
                "model": shape.name, "hardware": hw.name, "dtype": hw.dtype, "variant": v.label,
                "context": int(c), "batch": batch, "ms_per_step": ms, "tokens_per_s": batch / ms * 1e3,
                "cache_bytes_per_seq": cache_bytes(shape, v, int(c), dtype_bytes=e),
                "max_batch": max_batch(shape, v, hw, int(c)), "bound": hw.bound(cost),
            })
    return rows


def format_plan(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of :func:`plan` rows."""
    out = ["| model | hardware | variant | context | batch | ms/token | tokens/s | cache/seq | max batch | bound |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        mb = r["max_batch"]
        out.append(f"| {r['model']} | {r['hardware']} | {r['variant']} | {r['context']} | {r['batch']} | "
                   f"{r['ms_per_step']:.3g} | {r['tokens_per_s']:.4g} | {human_bytes(r['cache_bytes_per_seq'])} | "
                   f"{'unbounded' if mb >= 10**9 else mb} | {r['bound']} |")
    return "\n".join(out)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.3g} TB"  # pragma: no cover


def with_memory(hw: Hardware, memory: float) -> Hardware:
    """``hw`` with another memory size (e.g. what is free now)."""
    return replace(hw, memory=float(memory))


def shape_of_model(model: Any) -> ModelShape:
    """:func:`model_shape` of a loaded transformers model (before any variant changed it)."""
    return model_shape(model.config)


__all__ = [
    "Cost", "GPU_PROFILES", "Hardware", "ModelShape", "PUBLISHED_MODELS", "VariantShape", "cache_bytes",
    "decode_cost", "format_plan", "get_hardware", "hardware_from_dict", "kept_tokens", "matmul_params",
    "max_batch", "measure_cpu", "model_shape", "parse_variants", "plan", "predict_decode_ms", "prefill_cost",
    "resolve_variant", "stored_weight_bytes", "weight_bytes",
]
