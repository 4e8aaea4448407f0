"""LoRA on the query and value projections of SAM's image encoder (Segment Any Cell style).

Every attention block of SAM's ViT has one fused `qkv` Linear (C -> 3C) whose output rows
are q = [0:C], k = [C:2C], v = [2C:3C].  `apply_lora` replaces it in place by a
`LoraQkvLinear` that keeps the same `weight` and `bias` parameters and adds, for q and v
only (k untouched):

    h = W0 x + b + (alpha / r) * B(A(x))

with bias-free A: C -> r (Kaiming-uniform, a = sqrt(5), PyTorch's Linear default) and
B: r -> C (zero-initialised, so a fresh adapter leaves the model unchanged).  The paper
gives no rank or scaling; r = 4, alpha = 4 is the common public convention and wsiseg's
default.

State-dict keys: the official ones are unchanged (`...attn.qkv.weight`, `...attn.qkv.bias`);
the adapters add, for every block N,

    image_encoder.blocks.N.attn.qkv.lora_a_q.weight   (r, C)
    image_encoder.blocks.N.attn.qkv.lora_b_q.weight   (C, r)
    image_encoder.blocks.N.attn.qkv.lora_a_v.weight   (r, C)
    image_encoder.blocks.N.attn.qkv.lora_b_v.weight   (C, r)

`merge_lora` folds the adapters into `qkv.weight` and restores plain Linears, after which the
model is an ordinary SAM with exactly the official keys.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

#: suffixes of the LoRA parameters inside a qkv module.
LORA_KEYS: tuple[str, ...] = ("lora_a_q.weight", "lora_b_q.weight", "lora_a_v.weight", "lora_b_v.weight")


@dataclass(frozen=True)
class LoraConfig:
    """LoRA rank r and scaling alpha (the update is scaled by alpha / r)."""

    rank: int = 4
    alpha: float = 4.0

    def __post_init__(self) -> None:
        if int(self.rank) != self.rank or self.rank <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be a positive number, got {self.alpha!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_dict(cls, config: Mapping[str, object]) -> LoraConfig:
        unknown = set(config) - {"rank", "alpha"}
        if unknown:
            raise ValueError(f"unknown LoRA settings {sorted(unknown)}; expected 'rank' and 'alpha'")
        rank, alpha = config.get("rank", 4), config.get("alpha", 4.0)
        if not isinstance(rank, int) or not isinstance(alpha, (int, float)):
            raise ValueError(f"LoRA rank must be an integer and alpha a number, got {rank!r}, {alpha!r}")
        return cls(rank=rank, alpha=float(alpha))

    def to_dict(self) -> dict[str, float | int]:
        return {"rank": self.rank, "alpha": self.alpha}


def init_adapter(a_weight: torch.Tensor, b_weight: torch.Tensor, generator: torch.Generator | None = None) -> None:
    """Initialise one adapter in place: A (r, C) Kaiming-uniform (a = sqrt(5)), B (C, r) zeros."""
    # kaiming_uniform_ with a = sqrt(5) draws from U(-1 / sqrt(fan_in), 1 / sqrt(fan_in)).
    bound = 1.0 / math.sqrt(a_weight.shape[1])
    with torch.no_grad():
        a_weight.uniform_(-bound, bound, generator=generator)
        b_weight.zero_()


def fresh_lora_state(
    embed_dim: int, depth: int, config: LoraConfig, *, seed: int = 0, prefix: str = "image_encoder."
) -> dict[str, torch.Tensor]:
    """Adapter tensors (official-key-prefixed, see module docstring) for a fresh LoRA, without building a model."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for n in range(depth):
        base = f"{prefix}blocks.{n}.attn.qkv."
        for proj in ("q", "v"):
            a = torch.empty(config.rank, embed_dim)
            b = torch.empty(embed_dim, config.rank)
            init_adapter(a, b, generator)
            state[f"{base}lora_a_{proj}.weight"] = a
            state[f"{base}lora_b_{proj}.weight"] = b
    return state


class LoraQkvLinear(nn.Module):
    """A fused qkv projection (C -> 3C) with LoRA adapters on its q and v rows.

    Holds the original `weight` (3C, C) and `bias` (3C,) parameters (same objects), so the
    official keys are kept.  forward: (..., C) -> (..., 3C).
    """

    def __init__(self, base: nn.Linear, config: LoraConfig) -> None:
        super().__init__()
        out_features, in_features = base.weight.shape
        if out_features != 3 * in_features:
            raise ValueError(f"expected a fused qkv Linear (C -> 3C), got {in_features} -> {out_features}")
        self.in_features = in_features
        self.config = config
        self.weight = base.weight
        self.bias = base.bias
        kwargs = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_a_q = nn.Linear(in_features, config.rank, bias=False, **kwargs)  # type: ignore[arg-type]
        self.lora_b_q = nn.Linear(config.rank, in_features, bias=False, **kwargs)  # type: ignore[arg-type]
        self.lora_a_v = nn.Linear(in_features, config.rank, bias=False, **kwargs)  # type: ignore[arg-type]
        self.lora_b_v = nn.Linear(config.rank, in_features, bias=False, **kwargs)  # type: ignore[arg-type]
        for a, b in ((self.lora_a_q, self.lora_b_q), (self.lora_a_v, self.lora_b_v)):
            init_adapter(a.weight, b.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = F.linear(x, self.weight, self.bias)
        c = self.in_features
        s = self.config.scaling
        q = qkv[..., :c] + s * self.lora_b_q(self.lora_a_q(x))
        v = qkv[..., 2 * c :] + s * self.lora_b_v(self.lora_a_v(x))
        return torch.cat([q, qkv[..., c : 2 * c], v], dim=-1)

    def merged_linear(self) -> nn.Linear:
        """A plain Linear with W0 + (alpha / r) * B A folded into the q and v rows."""
        c = self.in_features
        linear = nn.Linear(c, 3 * c, bias=self.bias is not None, device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            weight = self.weight.detach().clone()
            s = self.config.scaling
            weight[:c] += s * (self.lora_b_q.weight @ self.lora_a_q.weight)
            weight[2 * c :] += s * (self.lora_b_v.weight @ self.lora_a_v.weight)
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        linear.weight.requires_grad_(self.weight.requires_grad)
        if self.bias is not None:
            linear.bias.requires_grad_(self.bias.requires_grad)
        return linear


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    encoder = getattr(model, "image_encoder", model)
    blocks = getattr(encoder, "blocks", None)
    if blocks is None:
        raise ValueError("LoRA needs a SAM model (or its image encoder) with `blocks`")
    return [block.attn for block in blocks]


def apply_lora(model: nn.Module, rank: int = 4, alpha: float = 4.0) -> nn.Module:
    """Add LoRA adapters to q and v of every image-encoder attention block, in place; returns `model`.

    A fresh adapter (B = 0) leaves the outputs unchanged.  Raises ValueError when the model
    already has adapters.
    """
    config = LoraConfig(rank=rank, alpha=alpha)
    attentions = _attention_modules(model)
    for attn in attentions:
        if not isinstance(attn.qkv, nn.Linear) or isinstance(attn.qkv, LoraQkvLinear):
            raise ValueError("the model already has LoRA adapters (or no plain qkv Linear); merge_lora() them first")
    for attn in attentions:
        attn.qkv = LoraQkvLinear(cast(nn.Linear, attn.qkv), config)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its qkv weights, in place; the model then has the official keys only."""
    for attn in _attention_modules(model):
        if isinstance(attn.qkv, LoraQkvLinear):
            attn.qkv = attn.qkv.merged_linear()
    return model


def has_lora(model: nn.Module) -> bool:
    """True when any image-encoder attention block carries LoRA adapters."""
    return any(isinstance(attn.qkv, LoraQkvLinear) for attn in _attention_modules(model))


def lora_parameters(model: nn.Module) -> list[torch.Tensor]:
    """The adapter parameters (A and B of q and v in every block), e.g. for an optimiser."""
    params: list[torch.Tensor] = []
    for attn in _attention_modules(model):
        if isinstance(attn.qkv, LoraQkvLinear):
            qkv = attn.qkv
            params += [qkv.lora_a_q.weight, qkv.lora_b_q.weight, qkv.lora_a_v.weight, qkv.lora_b_v.weight]
    return params


def lora_rank_of(state_dict: Mapping[str, torch.Tensor]) -> int | None:
    """The LoRA rank of a state dict holding adapter keys, or None when it has none."""
    for key, value in state_dict.items():
        if key.endswith(".attn.qkv.lora_a_q.weight"):
            return int(value.shape[0])
    return None
