"""The architecture record: one typed object for "what model is this".

:class:`Arch` is exactly the ``growloop.json["arch"]`` record of a checkpoint.  It is
built once -- from the command line (:meth:`Arch.from_args`), from a checkpoint
(:meth:`Arch.from_meta`) or from a Hugging Face ``config.json``
(:func:`megatron_growloop.convert.hf_config.arch_from_hf_config`) -- and then passed
around: the trainer holds it, growth derives the next one with :meth:`Arch.with_depth`,
inference tools change k with :meth:`Arch.with_repeats`, and
:func:`megatron_growloop.model.config.build_transformer_config` turns it into
megatron-core's ``TransformerConfig``.  Nobody re-derives the architecture from
``args`` or copies its fields one by one.

``num_layers`` counts *unique* layers; ``loop`` (a :class:`~megatron_growloop.looping.spec.LoopSpec`
or None) says how they are applied.  How a model is *run* (parallel layout, precision,
kernels) is not architecture: see :mod:`.parallel` and :mod:`.implementation`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Dict, List, Optional, Sequence

from ..accounting import ArchShape
from ..errors import UsageError
from ..looping.spec import LoopSpec, RepeatBlock, build_schedule

# Llama-3 RoPE frequency scaling defaults (transformers' ``rope_type: llama3``; megatron-core
# 0.16.1 hard-codes the same three numbers in ``RotaryEmbedding._apply_scaling``).
LLAMA3_LOW_FREQ_FACTOR = 1.0
LLAMA3_HIGH_FREQ_FACTOR = 4.0
LLAMA3_ORIGINAL_MAX_POSITIONS = 8192


def _arg(args, name: str, default):
    value = getattr(args, name, None)
    return default if value is None else value


def pad_vocab_size(vocab_size: int, divisible_by: int = 128, tp: int = 1) -> int:
    """Megatron-LM's rule (``megatron/training/tokenizer/tokenizer.py``'s ``_vocab_size_with_padding``):
    pad to a multiple of ``make_vocab_size_divisible_by * TP`` so the embedding splits over TP."""
    if vocab_size < 1 or divisible_by < 1 or tp < 1:
        raise UsageError(
            f"vocabulary padding needs positive sizes, got vocab {vocab_size}, divisible-by {divisible_by}, TP {tp}"
        )
    multiple = divisible_by * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


@dataclass(frozen=True)
class Arch:
    """A Llama-family decoder (RMSNorm, SwiGLU, RoPE, GQA, no biases), possibly looped."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    kv_channels: int
    seq_length: int
    max_position_embeddings: int
    padded_vocab_size: int
    rotary_base: float = 10000.0
    rope_scaling: bool = False
    rope_scaling_factor: float = 8.0
    rope_low_freq_factor: float = LLAMA3_LOW_FREQ_FACTOR
    rope_high_freq_factor: float = LLAMA3_HIGH_FREQ_FACTOR
    rope_original_max_position_embeddings: int = LLAMA3_ORIGINAL_MAX_POSITIONS
    norm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    untie_embeddings_and_output_weights: bool = False
    make_vocab_size_divisible_by: int = 128
    loop: Optional[LoopSpec] = None

    def __post_init__(self):
        if self.loop is not None and not isinstance(self.loop, LoopSpec):  # the checkpoint/flag string
            object.__setattr__(self, "loop", LoopSpec.parse(self.loop))
        if self.loop is not None and self.loop.unique_layers != self.num_layers:
            raise UsageError(
                f"loop {self.loop} has {self.loop.unique_layers} unique layers but the model has "
                f"{self.num_layers} (set --num-layers {self.loop.unique_layers})"
            )

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_args(cls, args, padded_vocab_size: int, **overrides) -> "Arch":
        """From parsed ``pretrain`` arguments (preset and overrides already applied);
        ``overrides`` replace fields (e.g. the depth of a resumed checkpoint)."""
        kw = dict(
            num_layers=args.num_layers,
            hidden_size=args.hidden_size,
            num_attention_heads=args.num_attention_heads,
            num_query_groups=args.num_query_groups,
            ffn_hidden_size=args.ffn_hidden_size,
            kv_channels=args.kv_channels,
            seq_length=args.seq_length,
            max_position_embeddings=args.max_position_embeddings,
            padded_vocab_size=int(padded_vocab_size),
            rotary_base=float(args.rotary_base),
            rope_scaling=bool(getattr(args, "rope_scaling", False)),
            rope_scaling_factor=float(getattr(args, "rope_scaling_factor", None) or 8.0),
            rope_low_freq_factor=float(_arg(args, "rope_low_freq_factor", LLAMA3_LOW_FREQ_FACTOR)),
            rope_high_freq_factor=float(_arg(args, "rope_high_freq_factor", LLAMA3_HIGH_FREQ_FACTOR)),
            rope_original_max_position_embeddings=int(
                _arg(args, "rope_original_max_position_embeddings", LLAMA3_ORIGINAL_MAX_POSITIONS)),
            norm_epsilon=float(args.norm_epsilon),
            init_method_std=float(args.init_method_std),
            untie_embeddings_and_output_weights=bool(args.untie_embeddings_and_output_weights),
            make_vocab_size_divisible_by=int(args.make_vocab_size_divisible_by),
            loop=getattr(args, "loop", None) or None,
        )
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def from_meta(cls, record: Dict[str, Any]) -> "Arch":
        """From a checkpoint's ``growloop.json["arch"]`` (older checkpoints lack the newer keys)."""
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in record.items() if k in known and v is not None}
        missing = [n for n in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                               "seq_length", "max_position_embeddings", "padded_vocab_size") if n not in kw]
        if missing:
            raise UsageError(f"checkpoint architecture record lacks {', '.join(missing)}")
        kw.setdefault("num_query_groups", kw["num_attention_heads"])
        kw.setdefault("kv_channels", kw["hidden_size"] // kw["num_attention_heads"])
        return cls(**kw)

    def to_meta(self) -> Dict[str, Any]:
        """The ``growloop.json["arch"]`` record (JSON types; the loop as its string)."""
        d = asdict(self)
        d["loop"] = str(self.loop) if self.loop is not None else None
        return d

    # ------------------------------------------------------------------ derived architectures
    def with_depth(self, num_layers: int) -> "Arch":
        """The same model at another depth (growth); only plain models grow."""
        if self.loop is not None:
            raise UsageError("growing a looped model is not supported")
        return replace(self, num_layers=int(num_layers))

    def with_loop(self, loop: Optional[LoopSpec]) -> "Arch":
        """The same unique layers applied along another loop (retrofitted recurrence)."""
        return replace(self, loop=loop)

    def with_repeats(self, repeats: int) -> "Arch":
        """The same looped model with k = ``repeats`` (changeable at inference and between phases)."""
        if self.loop is None:
            raise UsageError(
                "this model has no loop; use --repeat-block START:END:R to repeat a block "
                "or --retrofit-loop to train one"
            )
        if int(repeats) < 1:
            raise UsageError(f"loop repeats must be >= 1, got {repeats}")
        return replace(self, loop=self.loop.with_repeats(int(repeats)))

    # ------------------------------------------------------------------ schedule
    def schedule(self, repeat_blocks: Sequence[RepeatBlock] = ()) -> List[int]:
        """Unique-layer indices in application order (see :mod:`megatron_growloop.looping.spec`)."""
        return build_schedule(self.num_layers, self.loop, [RepeatBlock.parse(str(b)) for b in repeat_blocks])

    @property
    def effective_depth(self) -> int:
        return self.loop.effective_depth if self.loop is not None else self.num_layers

    # ------------------------------------------------------------------ derived facts
    @property
    def tied(self) -> bool:
        return not self.untie_embeddings_and_output_weights

    @property
    def shape(self) -> ArchShape:
        """The shape :mod:`megatron_growloop.accounting` counts parameters and FLOPs with."""
        return ArchShape(
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            ffn_hidden_size=self.ffn_hidden_size,
            kv_channels=self.kv_channels,
            vocab_size=self.padded_vocab_size,
            tied_embeddings=self.tied,
        )

    def check_parallel(self, tp: int, pp: int = 1, what: str = "") -> None:
        """Refuse a TP/PP layout megatron-core cannot build for this model (one line).

        ``what`` prefixes the sizes in the message, e.g. ``"target"`` for conversion."""
        label = f"{what} " if what else ""
        if tp < 1 or pp < 1:
            raise UsageError(f"{label}parallel sizes must be >= 1, got TP {tp}, PP {pp}")
        for name, n in (("attention heads", self.num_attention_heads), ("feed-forward size", self.ffn_hidden_size),
                        ("padded vocabulary", self.padded_vocab_size)):
            if n % tp:
                raise UsageError(f"{label}TP {tp} does not divide the model's {name} ({n})")
        ng = self.num_query_groups
        if ng % tp and tp % ng:
            raise UsageError(f"{label}TP {tp} and the model's {ng} key/value groups: one must divide the other")
        if pp > self.num_layers:
            raise UsageError(f"{label}PP {pp} exceeds the model's {self.num_layers} unique layers")
