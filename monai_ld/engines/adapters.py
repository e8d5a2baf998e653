"""Parameter-efficient fine-tuning of a ``DiffusionModelUNet``: LoRA and conditioning-embedding-only.

Both fold back into plain ``DiffusionModelUNet`` weights (:func:`merge_adapters`), so a fine-tuned model is saved
in the same checkpoint format as a fully trained one.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["LoRALinear", "ContextAdaptedLinear", "inject_lora", "inject_context_adapter", "merge_adapters", "FINETUNE_SCHEMES",
           "prepare_finetune"]

FINETUNE_SCHEMES = ("full", "embedding", "lora")


class LoRALinear(nn.Module):
    """``base(x) + (alpha / rank) · B(A(x))`` with ``base`` frozen, ``B`` zero-initialised (starts as ``base``)."""

    def __init__(self, base: nn.Linear, rank: int = 4, alpha: float | None = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.rank, self.scale = rank, float(alpha if alpha is not None else rank) / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scale

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            self.base.weight += self.scale * self.lora_b @ self.lora_a
        self.base.weight.requires_grad_(True)
        return self.base


class ContextAdaptedLinear(nn.Module):
    """``base(A · c)``: a cross-attention key/value projection reading the condition through a shared matrix ``A``."""

    def __init__(self, base: nn.Linear, adapter: nn.Linear):
        super().__init__()
        self.base, self.adapter = base, adapter
        for p in self.base.parameters():
            p.requires_grad_(False)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        return self.base(self.adapter(context))

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            self.base.weight.copy_(self.base.weight @ self.adapter.weight)
        self.base.weight.requires_grad_(True)
        return self.base


def _replace(module: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(module.get_submodule(parent_name) if parent_name else module, child, new)


def inject_lora(unet: nn.Module, rank: int = 4, alpha: float | None = None,
                targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "out_proj")) -> list[nn.Parameter]:
    """Wrap the attention projections named ``targets`` with :class:`LoRALinear`; returns the trainable parameters."""
    names = [n for n, m in unet.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets]
    if not names:
        raise ValueError(f"no Linear layers named {targets} in the UNet (does it have attention levels?)")
    params: list[nn.Parameter] = []
    for n in names:
        lora = LoRALinear(unet.get_submodule(n), rank, alpha)
        _replace(unet, n, lora)
        params += [lora.lora_a, lora.lora_b]
    return params


def inject_context_adapter(unet: nn.Module) -> list[nn.Parameter]:
    """Route the condition through one shared identity-initialised ``dim × dim`` matrix before every cross-attention
    key/value projection and an :class:`~monai_ld.networks.presets.AttributeUNet`'s condition embedding (the
    textual-inversion analogue: the UNet stays frozen, only how the condition is embedded is learned). Returns the
    adapter's parameters."""
    names = [n for n, m in unet.named_modules() if isinstance(m, nn.Linear) and ".attn2." in f".{n}" and n.rsplit(".", 1)[-1] in ("to_k", "to_v")]
    if not names:
        raise ValueError("the UNet has no cross-attention (with_conditioning=False?): nothing to adapt")
    dim = unet.get_submodule(names[0]).in_features
    # an AttributeUNet also reads the code into its time embedding: through the same matrix
    names += [n for n, m in unet.named_modules() if n == "class_embedding.0" and isinstance(m, nn.Linear) and m.in_features == dim]
    adapter = nn.Linear(dim, dim, bias=False)
    with torch.no_grad():
        adapter.weight.copy_(torch.eye(dim))
    for n in names:
        _replace(unet, n, ContextAdaptedLinear(unet.get_submodule(n), adapter))
    return list(adapter.parameters())


def merge_adapters(unet: nn.Module) -> nn.Module:
    """Fold every :class:`LoRALinear` / :class:`ContextAdaptedLinear` back into plain ``nn.Linear`` weights (in place)."""
    names = [n for n, m in unet.named_modules() if isinstance(m, (LoRALinear, ContextAdaptedLinear))]
    for n in names:
        _replace(unet, n, unet.get_submodule(n).merged())
    for p in unet.parameters():
        p.requires_grad_(True)
    return unet


def prepare_finetune(unet: nn.Module, scheme: str = "full", lora_rank: int = 4) -> list[nn.Parameter]:
    """Set up ``unet`` for a fine-tuning scheme and return the parameters to optimise.

    - ``"full"``: every UNet parameter;
    - ``"embedding"``: only a shared condition-embedding matrix (:func:`inject_context_adapter`);
    - ``"lora"``: rank-``lora_rank`` adapters on the attention projections (:func:`inject_lora`).
    """
    if scheme not in FINETUNE_SCHEMES:
        raise ValueError(f"unknown fine-tuning scheme {scheme!r}; accepted: {', '.join(FINETUNE_SCHEMES)}")
    if scheme == "full":
        for p in unet.parameters():
            p.requires_grad_(True)
        return list(unet.parameters())
    for p in unet.parameters():
        p.requires_grad_(False)
    return inject_context_adapter(unet) if scheme == "embedding" else inject_lora(unet, lora_rank)
