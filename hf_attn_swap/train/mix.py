"""Training text for uptraining: a mix of corpora, text sampled from the teacher, and generated recall sequences.

A recipe trained on one corpus teaches the converted model that corpus rather than restoring the original model
(issue 15: 0.89 of the log-perplexity gap won back on Shakespeare, 0.66 and 0.40 on two other English texts). The
remedy is text that covers the model's domain. A *mix* maps sources to shares of the training tokens:

- a corpus name from :data:`hf_attn_swap.data.CORPORA` (or a ``.txt`` file / directory): its train split;
- ``teacher``: text sampled from the teacher itself (temperature 1, no truncation, from the tokenizer's BOS token):
  the original model's own distribution, which needs no corpus and is, by construction, the text on which the
  student should behave like the teacher;
- ``recall``: generated key-value recall sequences: real training text with a few invented facts
  ("Ms Okafor's locker code is 58213.") scattered through it and asked back at the end. Conversion to fewer KV heads
  blurs keys, and a model that still predicts local text well can lose the ability to copy from far back (the
  passkey probe goes 18/18 -> 0/18 after uptraining on prose alone). The wording of these facts is deliberately
  unlike the passkey probe's (:mod:`hf_attn_swap.eval.passkey`): no "pass key", no repeated needle, no instruction.

Every stage (conversion calibration, per-layer transfer, end-to-end) gets its own disjoint slice of every source in
the mix's proportions, and the slices' blocks are shuffled together with the run's seed. A stage's blocks do not
depend on the later stages' budgets: corpora are read from the start in stage order, teacher samples and recall rows
are drawn per stage from their own seed, and recall rows take their real text from a fixed region at the end of each
corpus's train split (:data:`FILLER_CHARS`), which the plain-text blocks never reach. Corpora listed as held out
never enter any mix (:func:`check_sources`); evaluation reads only validation splits.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

logger = logging.getLogger(__name__)

TEACHER = "teacher"
RECALL = "recall"
#: characters at the end of each corpus's train split that recall rows draw their real text from (~16k tokens).
FILLER_CHARS = 65536
#: sources that are generated rather than read, with what they are.
GENERATED: dict[str, str] = {
    TEACHER: "text sampled from the teacher (temperature 1, from BOS)",
    RECALL: "generated key-value recall sequences over real training text",
}


def known_sources() -> list[str]:
    """Every name a mix may use: the package's corpora and the generated sources."""
    from ..data import list_corpora

    return [*list_corpora(), *GENERATED]


def _is_path(name: str) -> bool:
    return Path(name).expanduser().exists()


def check_sources(mix: Mapping[str, float], held_out: Sequence[str], eval_domains: Sequence[str] = ()) -> None:
    """Refuse, in one line each, what cannot be a training mix: unknown names, non-positive shares, a held-out corpus
    that is also trained on, a recall source with no real text to build it on, a generated source evaluated as a
    domain.

    Raises:
        ValueError: with what is allowed.
    """
    known = known_sources()
    for name, share in mix.items():
        if name not in known and not _is_path(name):
            raise ValueError(f"unknown training source {name!r} in the mix; allowed: {', '.join(known)}, or a .txt "
                             "file or directory")
        if not (isinstance(share, (int, float)) and share > 0):
            raise ValueError(f"the share of {name!r} in the mix must be a positive number, got {share!r}")
    for name in [*held_out, *eval_domains]:
        if name in GENERATED:
            raise ValueError(f"{name!r} is generated text, not a domain to evaluate on; evaluation domains are corpora "
                             f"({', '.join(k for k in known if k not in GENERATED)}) or .txt paths")
        if name not in known and not _is_path(name):
            raise ValueError(f"unknown evaluation domain {name!r}; allowed: "
                             f"{', '.join(k for k in known if k not in GENERATED)}, or a .txt file or directory")
    both = [n for n in held_out if n in mix]
    if both:
        raise ValueError(f"{', '.join(both)} is both in the training mix and held out: a held-out domain must never be "
                         "trained on; remove it from one of them")
    if RECALL in mix and not [n for n in mix if n not in GENERATED]:
        raise ValueError("the recall source writes its facts into real text: the mix needs at least one corpus beside "
                         f"{RECALL!r}")


@dataclass
class StageData:
    """Token blocks ``(n, L)`` for each stage, and how many tokens each source gave each stage."""

    blocks: dict[str, torch.Tensor]
    tokens: dict[str, dict[str, int]] = field(default_factory=dict)
    #: seconds spent sampling from the teacher (part of the run's cost).
    sampling_seconds: float = 0.0


def split_counts(total: int, mix: Mapping[str, float], block: int) -> dict[str, int]:
    """Whole blocks per source for ``total`` tokens in the mix's proportions (largest remainder, at least one block
    per source when ``total`` allows)."""
    n_blocks = total // block
    weight = sum(mix.values())
    exact = {k: n_blocks * v / weight for k, v in mix.items()}
    counts = {k: int(x) for k, x in exact.items()}
    for k in sorted(exact, key=lambda k: exact[k] - counts[k], reverse=True)[: n_blocks - sum(counts.values())]:
        counts[k] += 1
    return counts


def build_stage_data(
    tokenizer: Any,
    teacher: torch.nn.Module | None,
    mix: Mapping[str, float],
    needs: Mapping[str, int],
    block_size: int,
    seed: int = 0,
    progress: bool = False,
) -> StageData:
    """Blocks for each stage from the mix.

    Args:
        tokenizer: the model's tokenizer.
        teacher: the original model (needed for the ``teacher`` source only).
        mix: ``{source: share}``; see the module docstring.
        needs: ``{stage: tokens}`` in stage order (e.g. conversion, layerwise, end_to_end); 0 = none.
        block_size: tokens per block.
        seed: order of the blocks, the recall facts and the teacher's samples.

    Returns:
        :class:`StageData`; ``blocks[stage]`` has ``needs[stage] // block_size`` rows (0 rows for a stage that needs
        none).

    Raises:
        ValueError: a corpus whose train split is too small for its share (with the numbers).
    """
    import time

    from ..data import load_text, tokenize

    per_stage = {s: split_counts(n, mix, block_size) if n else {k: 0 for k in mix} for s, n in needs.items()}
    need_src = {k: sum(per_stage[s][k] for s in needs) for k in mix}
    real = [k for k in mix if k not in GENERATED]
    text_ids: dict[str, torch.Tensor] = {}
    fillers: list[torch.Tensor] = []
    for name in real:
        text = load_text(name, split="train")
        want = need_src[name] * block_size
        ids = tokenize(tokenizer, text, max_tokens=want) if want else torch.empty(0, dtype=torch.long)
        if ids.numel() < want:
            raise ValueError(
                f"corpus {name!r} is too small for its share of the mix: its train split has {ids.numel()} tokens, "
                f"the stages ask {want} ({mix[name]:g} of the mix); lower its share, add corpora, or lower the token "
                "budgets"
            )
        if RECALL in mix:
            # Recall rows are written into real text from the END of each corpus's train split (its last
            # FILLER_CHARS characters), a region the stages' plain-text blocks, read from the start, never reach: the
            # rows then do not depend on how many blocks the stages take (a filler "after the stages' blocks" did, so
            # a larger end-to-end budget changed the conversion's calibration). Only a corpus too short for both
            # gives its filler from just after its blocks.
            used_chars = int(len(tokenizer.decode(ids)) * 1.05) + 100 if ids.numel() else 0
            start = max(len(text) - FILLER_CHARS, used_chars)
            tail = text[start:]
            tail = tail[tail.find(" ") + 1:] if start else tail  # start on a word
            if tail.strip():
                fillers.append(tokenize(tokenizer, tail))
        text_ids[name] = ids
    sampled = 0.0
    filler = torch.cat(fillers) if fillers else torch.empty(0, dtype=torch.long)
    stage_blocks: dict[str, dict[str, torch.Tensor]] = {s: {} for s in needs}
    used = {k: 0 for k in real}
    for stage_i, stage in enumerate(needs):
        # each stage's generated rows come from its own seed: the conversion's calibration is the same whatever the
        # later stages' budgets
        stage_seed = seed + 7919 * stage_i
        for k in mix:
            n = per_stage[stage][k]
            if k in real:
                stage_blocks[stage][k] = text_ids[k][used[k] * block_size: (used[k] + n) * block_size].view(n, block_size)
                used[k] += n
            elif k == TEACHER:
                if n and teacher is None:
                    raise ValueError("the 'teacher' source needs the teacher model")
                t = time.perf_counter()
                stage_blocks[stage][k] = teacher_samples(teacher, tokenizer, n, block_size, seed=stage_seed,
                                                         progress=progress) if n else torch.empty(0, block_size,
                                                                                                  dtype=torch.long)
                sampled += time.perf_counter() - t
            else:  # RECALL
                stage_blocks[stage][k] = recall_blocks(tokenizer, filler, n, block_size, seed=stage_seed) if n \
                    else torch.empty(0, block_size, dtype=torch.long)
    out: dict[str, torch.Tensor] = {}
    for stage_i, stage in enumerate(needs):
        parts = [stage_blocks[stage][k] for k in mix]
        rows = torch.cat(parts) if parts else torch.empty(0, block_size, dtype=torch.long)
        order = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(seed + 7919 * stage_i))
        out[stage] = rows[order]
    tokens = {s: {k: per_stage[s][k] * block_size for k in mix} for s in needs}
    return StageData(out, tokens, sampled)


@torch.no_grad()
def teacher_samples(model: torch.nn.Module, tokenizer: Any, n_rows: int, length: int, *, seed: int = 0,
                    batch_size: int = 16, temperature: float = 1.0, piece: int = 256,
                    progress: bool = False) -> torch.Tensor:
    """``n_rows`` sequences of ``length`` tokens sampled from ``model`` (ancestral sampling through its cache).

    Each sample starts at the tokenizer's BOS token (its EOS where there is no BOS), kept as its first token, so a
    sample is exactly what the model generated after it. Rows longer than ``piece`` tokens are several samples of
    ``piece`` tokens end to end (BOS marks each start, as between documents in pre-training): a decode step's cost
    grows with the context, so two 256-token samples cost about half of one 512-token sample on a CPU.
    Deterministic from ``seed`` on one device.
    """
    if n_rows > 0 and length > piece:
        per_row = -(-length // piece)
        flat = teacher_samples(model, tokenizer, n_rows * per_row, piece, seed=seed, batch_size=batch_size,
                               temperature=temperature, piece=piece, progress=progress)
        return flat.view(n_rows, per_row * piece)[:, :length].contiguous()
    from ..hf_compat import cache_kwarg, output_cache
    from ..progress import progress as progress_bar

    if n_rows <= 0:
        return torch.empty(0, length, dtype=torch.long)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ValueError("sampling from the teacher needs a tokenizer with a BOS or EOS token to start from")
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    was = model.training
    model.eval()
    rows = []
    bar = progress_bar(desc="sampling from the teacher", total=n_rows * length, unit="tok", force=progress)
    try:
        for lo in range(0, n_rows, batch_size):
            b = min(batch_size, n_rows - lo)
            ids = torch.full((b, 1), start, dtype=torch.long, device=device)
            out = model(input_ids=ids, use_cache=True)
            cache, name = output_cache(out), cache_kwarg(model)
            seq = [ids]
            for t in range(length - 1):
                probs = torch.softmax(out.logits[:, -1].float() / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=gen)
                seq.append(nxt)
                if t < length - 2:
                    out = model(input_ids=nxt, **{name: cache}, use_cache=True)
                    cache = output_cache(out)
            rows.append(torch.cat(seq, dim=1).cpu())
            bar.update(b * length)
    finally:
        model.train(was)
        bar.close()
    return torch.cat(rows)


# Invented facts for the recall source. The wording is plain English bookkeeping, chosen to be unlike the passkey
# probe (which says "The pass key is N. Remember it. N is the pass key." inside repeated filler).
_PEOPLE = ("Ms Okafor", "Mr Lindqvist", "Dr Haddad", "Captain Morrow", "Aunt Beatrix", "Professor Tanaka", "Mrs Delgado",
           "young Tobias", "Sister Agnes", "Mr Abernathy", "the widow Carrow", "Judge Ferreira", "Nurse Iwu",
           "old Mr Pike", "Lady Ashcombe", "the clerk Jensen")
_ITEMS = ("locker code", "room number", "ticket number", "account number", "phone extension", "badge number",
          "order number", "seat number", "licence number", "postal code", "parcel number", "case number")
_FACTS = ("{who}'s {item} is {value}.", "For the record, the {item} of {who} is {value}.",
          "{who} wrote down the {item}: {value}.", "(Note: {who}, {item} {value}.)")
_QUERIES = ("{who}'s {item} is {value}", "The {item} of {who} is {value}", "{who}, {item}: {value}")


def _value(rng: random.Random) -> str:
    digits = rng.choice((3, 4, 5, 5, 6, 7))
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


def recall_blocks(tokenizer: Any, filler: torch.Tensor, n_rows: int, length: int, *, seed: int = 0) -> torch.Tensor:
    """``n_rows`` recall sequences of exactly ``length`` tokens.

    Each row: real text (a window of ``filler``) with 1-3 invented facts at random depths, then 1-2 of those facts
    asked back at the end with their values; the row ends on the last value. Facts are tokenized on their own and
    spliced between filler tokens, so the answer is always the same token sequence as the fact's value.

    Raises:
        ValueError: ``filler`` shorter than one row, or ``length`` too short for the facts.
    """
    if n_rows <= 0:
        return torch.empty(0, length, dtype=torch.long)
    if filler.numel() < length:
        raise ValueError(f"recall sequences need at least {length} tokens of real filler text, got {filler.numel()}")
    rng = random.Random(seed * 1_000_003 + 17)

    def enc(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    rows = []
    for _ in range(n_rows):
        n_facts = rng.randint(1, 3)
        people = rng.sample(_PEOPLE, n_facts)
        facts = [(who, rng.choice(_ITEMS), _value(rng)) for who in people]
        fact_ids = [enc(" " + rng.choice(_FACTS).format(who=w, item=i, value=v) + " ") for w, i, v in facts]
        asked = rng.sample(facts, rng.randint(1, n_facts))
        query_ids = []
        for w, i, v in asked:
            query_ids += enc("\n" + rng.choice(_QUERIES).format(who=w, item=i, value=v) + ".")
        query_ids = query_ids[:-1]  # end on the value: its last token is the last prediction target
        n_fill = length - sum(map(len, fact_ids)) - len(query_ids)
        if n_fill < 8:
            raise ValueError(f"recall rows of {length} tokens are too short for their facts; use block_size >= 128")
        lo = rng.randrange(0, filler.numel() - n_fill + 1)
        fill = filler[lo: lo + n_fill].tolist()
        cuts = sorted(rng.randrange(0, n_fill) for _ in fact_ids)
        row, prev = [], 0
        for cut, ids in zip(cuts, fact_ids):
            row += fill[prev:cut] + ids
            prev = cut
        row += fill[prev:] + query_ids
        assert len(row) == length, (len(row), length)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long)


def domain_ids(tokenizer: Any, domains: Sequence[str], n_tokens: int) -> dict[str, torch.Tensor]:
    """The first ``n_tokens`` of each domain's validation split (disjoint from every train split by
    :func:`hf_attn_swap.data.load_text`'s rule).

    Raises:
        ValueError: a domain whose validation split has fewer than ``n_tokens`` tokens.
    """
    from ..data import load_text, tokenize

    out = {}
    for name in domains:
        ids = tokenize(tokenizer, load_text(name, split="validation"), max_tokens=n_tokens)
        if ids.numel() < n_tokens:
            raise ValueError(f"the validation split of {name!r} has {ids.numel()} tokens, fewer than the {n_tokens} "
                             "evaluation asks (eval_windows * eval_context); lower eval_windows")
        out[name] = ids
    return out


def describe(mix: Mapping[str, float]) -> str:
    """``"shakespeare 25%, kjv 25%, teacher 50%"``."""
    total = sum(mix.values())
    return ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in mix.items())


def mix_of(cfg: Any) -> dict[str, float]:
    """The config's training mix: ``cfg.mix``, else its single ``corpus``."""
    return dict(cfg.mix) if cfg.mix else {cfg.corpus: 1.0}


def eval_domains_of(cfg: Any) -> list[str]:
    """The domains evaluated one by one: ``cfg.eval_domains``, else every corpus of the mix and every held-out one."""
    if cfg.eval_domains:
        names = list(cfg.eval_domains)
    else:
        names = [k for k in mix_of(cfg) if k not in GENERATED]
    return list(dict.fromkeys([*names, *cfg.held_out]))
