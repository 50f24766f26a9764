"""Speculative decoding for `Runtime.generate(..., speculative=Speculative(...))`: greedy and sampled rounds on
the device, captured as CUDA graphs on a GPU (exec/spec_rounds.py). exec/speculative.py keeps the host-loop
rounds (a model draft's own sampled drafts) as the reference the tests compare with.

Drafts: "lookup" (prompt lookup: n-grams of the prompt and the output so far), "self-int4" (the target's own
checkpoint quantized to int4 on load, fully resident), a path to a draft checkpoint with the target's vocabulary,
or an already loaded `Runtime`. Greedy output equals the target's greedy output; sampled output has the
target's distribution (the rejection rule).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from .config import ConfigError
from .exec.device_drafts import DeviceLookup, DeviceModelDraft
from .exec.spec_rounds import SpecRounds
from .exec.speculative import SpecStats
from .sampling import SamplingParams

Runtime = Any   # graphrt.runtime.Runtime (not imported: runtime imports this module); drafts load as type(target)

DRAFT_KINDS = ("lookup", "self-int4")


@dataclass(frozen=True)
class Speculative:
    draft: Union[str, Path, Runtime] = "lookup"     # "lookup", "self-int4", a checkpoint path, or a Runtime
    k: int = 4                                       # tokens drafted per target pass
    ngram: int = 3                                   # prompt lookup: longest n-gram matched

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"speculative k must be an integer >= 1, got {self.k!r}")
        if isinstance(self.ngram, bool) or not isinstance(self.ngram, int) or self.ngram < 1:
            raise ValueError(f"speculative ngram must be an integer >= 1, got {self.ngram!r}")


def check_room(target: Runtime, batch: int, longest: int, max_new_tokens: int, k: int) -> None:
    """A round writes k positions past the row's end: refuse what max_seq_len cannot hold, before any work."""
    need = longest + max_new_tokens + k
    if need > target.options.max_seq_len:
        raise ConfigError(f"speculative decoding with k={k} needs max_seq_len >= prompt + new tokens + k = {need}, "
                          f"the runtime has {target.options.max_seq_len}; lower k or max_new_tokens, or load the "
                          "runtime with a larger max_seq_len")
    target.engine.check_shape(batch, need)


def load_draft_runtime(target: Runtime, spec: Speculative) -> Runtime:
    """The draft model's runtime, checked against the target (vocabulary, tokenizer, sizes)."""
    cls = type(target)
    o = target.options
    kw = dict(max_batch_size=o.max_batch_size, max_seq_len=o.max_seq_len, prefill_chunk=o.prefill_chunk)
    if isinstance(spec.draft, cls):
        draft = spec.draft
    elif spec.draft == "self-int4":
        draft = cls(target.source, target.device, target.dtype, type(o)(quantization="int4", **kw))
    else:
        path = Path(spec.draft)
        if not path.exists():
            raise ConfigError(f"draft {spec.draft!r}: no such checkpoint; use 'lookup', 'self-int4' or a path to a "
                              "draft model with the target's tokenizer")
        draft = cls(path, target.device, target.dtype, type(o)(**kw))
    if draft.config.vocab_size != target.config.vocab_size:
        raise ConfigError(f"the draft's vocabulary has {draft.config.vocab_size} tokens, the target's "
                          f"{target.config.vocab_size}: a draft must share the target's tokenizer")
    if draft.tokenizer is not None and target.tokenizer is not None \
            and draft.tokenizer.get_vocab() != target.tokenizer.get_vocab():
        raise ConfigError("the draft's tokenizer differs from the target's (same size, other tokens): a draft "
                          "must share the target's tokenizer")
    if draft.options.max_seq_len < o.max_seq_len or draft.options.max_batch_size < o.max_batch_size:
        raise ConfigError(f"the draft runtime holds max_seq_len={draft.options.max_seq_len}, max_batch_size="
                          f"{draft.options.max_batch_size}; it needs at least the target's ({o.max_seq_len}, "
                          f"{o.max_batch_size})")
    return draft


def draft_key(spec: Speculative):
    """What identifies a loaded draft model (None: prompt lookup, which loads nothing)."""
    if isinstance(spec.draft, str) and spec.draft == "lookup":
        return None
    return str(spec.draft) if isinstance(spec.draft, (str, Path)) else id(spec.draft)


class Speculation:
    """One target runtime's drafts (loaded once) and the device rounds built for them (captured graphs kept for
    the next call, by draft, k, ngram, batch, greedy or sampled, and mode)."""

    def __init__(self):
        self.drafts: dict = {}
        self.rounds: dict = {}

    def blocks(self, target: Runtime, spec: Speculative, ids, lengths: list[int], max_new_tokens: int,
               params: SamplingParams, capture: bool, stats: SpecStats | None):
        """The tokens each row gains, per block (see Runtime.stream): device rounds, captured when `capture`;
        greedy, or sampled with the rejection rule."""
        check_room(target, len(lengths), max(lengths), max_new_tokens, spec.k)
        key = draft_key(spec)
        if key is not None and key not in self.drafts:
            self.drafts[key] = load_draft_runtime(target, spec)
        slot = (key, spec.k, spec.ngram, len(lengths), params.greedy, capture)
        if slot not in self.rounds:
            if key is None:
                device_draft = DeviceLookup(spec.ngram)
            else:
                d = self.drafts[key]
                device_draft = DeviceModelDraft(d.engine, len(lengths), streamed=bool(d.placement.streamed))
            self.rounds[slot] = SpecRounds(target.engine, device_draft, len(lengths), spec.k, capture, params.greedy)
        return self.rounds[slot].run(ids, lengths, max_new_tokens, stats, params=params)

    def release(self) -> None:
        """Drop the captured rounds (before the runtime's memory or process group goes)."""
        self.rounds = {}
