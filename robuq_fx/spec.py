"""`LayerSpec`: what one quantized linear layer computes (bits, Hadamard, low-rank branch, quantizer options).

A spec coming out of a policy rule may leave things open (`hadamard_block=None`, `a_sym=None`); `resolve()` fills
them in for a concrete layer of shape (in_features, out_features) and checks everything that depends on the shape.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

from .errors import SpecError

WEIGHT_BITS = (1.58, 2, 3, 4, 8)
ACT_BITS = (1, 2, 3, 4, 8, 16)  # 16 = activation quantization off
A_CLIPS = ("absmax", "sigma")
W_GRANULARITIES = ("channel", "tensor")
SCALE_DTYPES = ("float32", "float16", "bfloat16")
DEFAULT_LRB_RANK = 32  # METHOD.md §1: the paper leaves the rank open; nunchaku uses 32


def normalize_w_bits(value, where: str = "") -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(f"{where}w_bits={value!r}: expected one of {WEIGHT_BITS} (1.58 = ternary)")
    for b in WEIGHT_BITS:
        if abs(float(value) - b) < 1e-9:
            return b
    raise SpecError(f"{where}w_bits={value!r} is not supported: expected one of {WEIGHT_BITS} (1.58 = ternary)")


def normalize_a_bits(value, where: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) not in ACT_BITS:
        raise SpecError(f"{where}a_bits={value!r} is not supported: expected one of {ACT_BITS} (16 = off)")
    return int(value)


@dataclass(frozen=True)
class LayerSpec:
    w_bits: float = 4
    a_bits: int = 4
    hadamard: bool = True
    hadamard_block: int | None = None  # None: largest power of two <= 128 dividing in_features
    lora_rank: int = 0  # rank of the full-precision low-rank branch (METHOD.md §1); 0 = none
    group_size: int = 0  # 0: one weight scale per output channel (or per tensor); g: per g inputs
    a_sym: bool | None = None  # None: symmetric for a_bits >= 3, asymmetric below (METHOD.md §3)
    a_clip: str = "absmax"
    w_granularity: str = "channel"
    scale_dtype: str = "float32"
    # 0: one activation range per token (METHOD.md §3, the default); g: one per token and g consecutive inputs (e.g.
    # 128, the Hadamard block: each K tile of a GEMM then quantizes on its own; issue 20's `a_group` option)
    a_group: int = 0

    FIELDS = ("w_bits", "a_bits", "hadamard", "hadamard_block", "lora_rank", "group_size", "a_sym", "a_clip",
              "w_granularity", "scale_dtype", "a_group")

    def __post_init__(self):
        where = ""
        object.__setattr__(self, "w_bits", normalize_w_bits(self.w_bits, where))
        object.__setattr__(self, "a_bits", normalize_a_bits(self.a_bits, where))
        if not isinstance(self.hadamard, bool):
            raise SpecError(f"hadamard={self.hadamard!r}: expected true or false")
        if self.hadamard_block is not None:
            b = self.hadamard_block
            if isinstance(b, bool) or not isinstance(b, int) or b < 0 or b & (b - 1) or (b == 0 and self.hadamard):
                raise SpecError(f"hadamard_block={b!r}: expected a power of two (e.g. 64, 128)")
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise SpecError(f"lora_rank={self.lora_rank!r}: expected an integer >= 1 (0 = no low-rank branch)")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 0:
            raise SpecError(f"group_size={self.group_size!r}: expected 0 (per channel) or a positive integer")
        if isinstance(self.a_group, bool) or not isinstance(self.a_group, int) or self.a_group < 0:
            raise SpecError(f"a_group={self.a_group!r}: expected 0 (one activation range per token) or a positive "
                            "integer (per token and that many inputs)")
        if self.a_clip not in A_CLIPS:
            raise SpecError(f"a_clip={self.a_clip!r}: expected one of {A_CLIPS}")
        if self.w_granularity not in W_GRANULARITIES:
            raise SpecError(f"w_granularity={self.w_granularity!r}: expected one of {W_GRANULARITIES}")
        if self.group_size and self.w_granularity != "channel":
            raise SpecError("group_size applies to per-channel scales; it cannot be combined with "
                            "w_granularity='tensor'")
        if self.scale_dtype not in SCALE_DTYPES:
            raise SpecError(f"scale_dtype={self.scale_dtype!r}: expected one of {SCALE_DTYPES}")
        if self.a_sym is not None and not isinstance(self.a_sym, bool):
            raise SpecError(f"a_sym={self.a_sym!r}: expected true, false or null (automatic)")
        if self.a_sym and self.a_bits <= 2:
            raise SpecError(f"a_sym=true with a_bits={self.a_bits}: activations of 1 or 2 bits are always "
                            "asymmetric (symmetric codes waste a level; METHOD.md §3)")

    @classmethod
    def from_dict(cls, d: dict, where: str = "") -> "LayerSpec":
        unknown = sorted(set(d) - set(cls.FIELDS))
        if unknown:
            raise SpecError(f"{where}unknown key(s) {unknown}: expected any of {list(cls.FIELDS)}")
        try:
            return cls(**d)
        except SpecError as e:
            raise SpecError(f"{where}{e}") from None

    def to_dict(self) -> dict:
        return {f: getattr(self, f) for f in self.FIELDS}

    @property
    def sym(self) -> bool:
        """Symmetric activation codes? (resolved default: a_bits >= 3)."""
        return self.a_sym if self.a_sym is not None else self.a_bits >= 3

    def resolve(self, in_features: int, out_features: int, name: str = "") -> "LayerSpec":
        """The concrete spec for a layer: Hadamard block chosen and checked, a_sym fixed, shapes validated."""
        at = f"layer '{name}' (in_features={in_features}, out_features={out_features}): " if name else ""
        block = 0
        if self.hadamard:
            if self.hadamard_block is None:
                block = default_block(in_features)
            else:
                block = self.hadamard_block
                if in_features % block:
                    raise SpecError(f"{at}hadamard_block={block} does not divide in_features={in_features}; "
                                    f"use a power of two dividing it (largest <=128: {default_block(in_features)})")
        if self.lora_rank > min(in_features, out_features):
            raise SpecError(f"{at}lora_rank={self.lora_rank} exceeds min(in_features, out_features)="
                            f"{min(in_features, out_features)}")
        if self.lora_rank and self.lora_rank == min(in_features, out_features):
            warnings.warn(f"{at}lora_rank={self.lora_rank} = min(in_features, out_features): the low-rank branch holds "
                          "the whole weight and nothing is left to quantize", stacklevel=3)
        if self.group_size and in_features % self.group_size:
            raise SpecError(f"{at}group_size={self.group_size} does not divide in_features={in_features}")
        if self.a_group and in_features % self.a_group:
            raise SpecError(f"{at}a_group={self.a_group} does not divide in_features={in_features}")
        return dataclasses.replace(self, hadamard=block > 1, hadamard_block=block if block > 1 else 0,
                                   a_sym=self.sym)

    def short(self) -> str:
        w = "W1.58" if self.w_bits == 1.58 else f"W{self.w_bits}"
        a = "A16" if self.a_bits == 16 else f"A{self.a_bits}{'' if self.sym else 'asym'}"
        s = w + a
        if self.hadamard:
            s += f" H{self.hadamard_block or 'auto'}"
        if self.lora_rank:
            s += f" LRB{self.lora_rank}"
        if self.group_size:
            s += f" g{self.group_size}"
        if self.a_clip != "absmax":
            s += f" clip={self.a_clip}"
        if self.a_group:
            s += f" ag{self.a_group}"
        if self.w_granularity != "channel":
            s += f" w/{self.w_granularity}"
        return s


def default_block(k: int, max_block: int = 128) -> int:
    """Largest power of two <= max_block that divides k (1 when k is odd: no rotation possible)."""
    b = 1
    while b * 2 <= max_block and k % (b * 2) == 0:
        b *= 2
    return b
