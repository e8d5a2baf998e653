"""Anti-causal oracle predictors and the feature networks used by the realism metrics.

An :class:`AttributeOracle` predicts every attribute of an :class:`~monai_ld.conditioning.AttributeEncoder` from an
image: a compact MONAI :class:`~monai.networks.nets.ResNet` backbone (basic blocks, one block per stage, few
channels; 2D or 3D by ``spatial_dims``; global average pooling, so any image size works) with one linear head per
attribute:

- continuous attribute: one output, regressed (MSE) on the value normalised to ``[0, 1]`` by the attribute's
  declared range (``AttributeEncoder`` convention); :meth:`AttributeOracle.predict` maps it back to the
  attribute's units;
- categorical attribute: ``K`` logits, softmax cross-entropy.

Trained on REAL images (:func:`train_oracle`), it serves (a) effectiveness — predictions on counterfactuals vs the
intended targets, (b) the oracle loss of the δ search and (c) the domain feature network for FID/KID/MMD:
:meth:`AttributeOracle.features` is the pooled penultimate layer ``(B, F)``. No Inception weights exist offline, so
report such numbers as ``feature_network: "oracle-penultimate"`` (:data:`ORACLE_FEATURE_NETWORK`).

Any ``Callable[[Tensor], Tensor]`` returning ``(B, F)`` can stand in as a feature network (:func:`extract_features`).

Checkpoints: ``torch.save`` of ``{"format", "config", "state_dict"}`` (plain types + tensors), written atomically,
read back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets import ResNet
from torch import nn

from ..conditioning import AttributeEncoder, CategoricalAttribute, ContinuousAttribute
from ._checks import EvaluationError, atomic_write, check_images

__all__ = [
    "ORACLE_FEATURE_NETWORK",
    "CHECKPOINT_FORMAT",
    "FeatureExtractor",
    "AttributeOracle",
    "train_oracle",
    "extract_features",
    "attribute_targets",
]

ORACLE_FEATURE_NETWORK = "oracle-penultimate"
CHECKPOINT_FORMAT = "monai_ld.attribute_oracle/1"
FeatureExtractor = Callable[[torch.Tensor], torch.Tensor]


def _as_encoder(encoder) -> AttributeEncoder:
    return encoder if isinstance(encoder, AttributeEncoder) else AttributeEncoder(encoder)


class AttributeOracle(nn.Module):
    """Image -> every attribute of ``encoder``.

    Args:
        encoder: the attribute specs (an :class:`AttributeEncoder` or its config list).
        spatial_dims: 2 or 3.
        in_channels: image channels ``C``.
        channels: ResNet stage widths (4 values); the feature dimension ``F`` is ``channels[-1]``.
        conv1_kernel, conv1_stride, no_max_pool: the ResNet stem (defaults shrink a 64³ volume 4× before stage 1).

    Shapes: input ``(B, C, H, W[, D])``; :meth:`forward` -> ``{name: (B,) normalised value | (B, K) logits}``;
    :meth:`features` -> ``(B, F)``.
    """

    def __init__(
        self,
        encoder: AttributeEncoder | Sequence[Mapping],
        spatial_dims: int = 2,
        in_channels: int = 1,
        channels: Sequence[int] = (8, 16, 32, 64),
        conv1_kernel: int = 7,
        conv1_stride: int = 2,
        no_max_pool: bool = False,
    ):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise EvaluationError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if len(channels) != 4:
            raise EvaluationError(f"channels must list 4 stage widths, got {list(channels)}")
        self.encoder = _as_encoder(encoder)
        self.spatial_dims = int(spatial_dims)
        self.in_channels = int(in_channels)
        self.channels = tuple(int(c) for c in channels)
        self.conv1_kernel, self.conv1_stride, self.no_max_pool = int(conv1_kernel), int(conv1_stride), bool(no_max_pool)
        self.backbone = ResNet(
            block="basic",
            layers=[1, 1, 1, 1],
            block_inplanes=list(self.channels),
            spatial_dims=self.spatial_dims,
            n_input_channels=self.in_channels,
            conv1_t_size=self.conv1_kernel,
            conv1_t_stride=self.conv1_stride,
            no_max_pool=self.no_max_pool,
            feed_forward=False,
        )
        self.heads = nn.ModuleList(nn.Linear(self.feature_dim, a.width) for a in self.encoder.attributes)
        self.history: list[dict] = []

    @property
    def feature_dim(self) -> int:
        return self.channels[-1]

    def config(self) -> dict:
        return {
            "encoder": self.encoder.to_config(),
            "spatial_dims": self.spatial_dims,
            "in_channels": self.in_channels,
            "channels": list(self.channels),
            "conv1_kernel": self.conv1_kernel,
            "conv1_stride": self.conv1_stride,
            "no_max_pool": self.no_max_pool,
        }

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        x = check_images(x, "oracle input", self.spatial_dims)
        if x.shape[1] != self.in_channels:
            raise EvaluationError(f"oracle expects {self.in_channels} channel(s), got images {tuple(x.shape)}")
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *spatial)`` -> pooled penultimate features ``(B, F)`` (with gradients, current mode)."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw head outputs: continuous ``(B,)`` normalised values, categorical ``(B, K)`` logits."""
        h = self.forward_features(x)
        out = {}
        for a, head in zip(self.encoder.attributes, self.heads):
            o = head(h)
            out[a.name] = o[:, 0] if isinstance(a, ContinuousAttribute) else o
        return out

    @torch.no_grad()
    def _batched(self, fn, images: torch.Tensor, batch_size: int):
        images = self._check(images)
        was_training = self.training
        self.eval()
        try:
            dev = next(self.parameters()).device
            return [fn(images[i : i + batch_size].to(dev)) for i in range(0, images.shape[0], batch_size)]
        finally:
            self.train(was_training)

    def features(self, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """Penultimate-layer features ``(B, F)`` in eval mode (the ``"oracle-penultimate"`` feature network)."""
        return torch.cat([f.cpu() for f in self._batched(self.forward_features, images, batch_size)])


    def predict_normalised(self, images: torch.Tensor, batch_size: int = 32) -> dict[str, torch.Tensor]:
        """``{name: (B,) value in [0, 1]-normalised units | (B, K) softmax probabilities}``."""
        parts = self._batched(self.forward, images, batch_size)
        out = {}
        for a in self.encoder.attributes:
            v = torch.cat([p[a.name].cpu() for p in parts])
            out[a.name] = v if isinstance(a, ContinuousAttribute) else v.softmax(dim=1)
        return out

    def predict(self, images: torch.Tensor, batch_size: int = 32) -> dict[str, torch.Tensor]:
        """``{name: (B,) float in the attribute's units | (B,) long class index}``."""
        norm = self.predict_normalised(images, batch_size)
        out = {}
        for a in self.encoder.attributes:
            v = norm[a.name]
            out[a.name] = a.low + v * (a.high - a.low) if isinstance(a, ContinuousAttribute) else v.argmax(dim=1)
        return out

    def predict_rows(self, images: torch.Tensor, batch_size: int = 32) -> list[dict]:
        """One ``{name: value}`` dict per image (class names for categorical attributes)."""
        pred = self.predict(images, batch_size)
        rows = []
        for i in range(images.shape[0]):
            row = {}
            for a in self.encoder.attributes:
                v = pred[a.name][i]
                row[a.name] = a.classes[int(v)] if isinstance(a, CategoricalAttribute) else float(v)
            rows.append(row)
        return rows

    # -- persistence ------------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> str:
        """Atomic ``torch.save`` of ``{"format", "config", "state_dict", "history"}``."""
        payload = {
            "format": CHECKPOINT_FORMAT,
            "config": self.config(),
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()},
            "history": [dict(h) for h in self.history],
        }
        return atomic_write(path, lambda tmp: torch.save(payload, tmp))

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> AttributeOracle:
        """Rebuild an oracle saved by :meth:`save` (``torch.load(weights_only=True)``)."""
        payload = torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            raise EvaluationError(f"{path}: not an AttributeOracle checkpoint (format {CHECKPOINT_FORMAT!r})")
        oracle = cls(**payload["config"])
        oracle.load_state_dict(payload["state_dict"])
        oracle.history = list(payload.get("history", []))
        oracle.eval()
        return oracle


def attribute_targets(rows: Sequence[Mapping | None], encoder: AttributeEncoder) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Training targets from attribute rows (partial rows allowed).

    Returns:
        ``{name: (values, known)}``: ``values`` is ``(N,)`` float normalised to [0, 1] (continuous) or ``(N,)`` long
        class index (categorical); ``known`` ``(N,)`` bool marks rows that carry the attribute.
    """
    encoder = _as_encoder(encoder)
    out = {}
    clean = [encoder.validate(r, partial=True) if r is not None else {} for r in rows]
    for a in encoder.attributes:
        known = torch.tensor([a.name in r for r in clean], dtype=torch.bool)
        if isinstance(a, ContinuousAttribute):
            vals = torch.tensor([a.encode(r[a.name])[0] if a.name in r else 0.0 for r in clean], dtype=torch.float32)
        else:
            vals = torch.tensor([a.validate(r[a.name]) if a.name in r else 0 for r in clean], dtype=torch.long)
        out[a.name] = (vals, known)
    return out


def _oracle_loss(oracle: AttributeOracle, out: dict, targets: dict, idx: torch.Tensor,
                 weights: Mapping[str, float] | None = None) -> torch.Tensor:
    """Σ w·MSE (continuous, [0, 1] scale) + Σ w·cross-entropy (categorical) over the rows that carry each attribute
    (``weights``: per attribute, 1 when absent)."""
    total = out[oracle.encoder.names[0]].new_zeros(())
    for a in oracle.encoder.attributes:
        vals, known = targets[a.name]
        vals, known = vals[idx], known[idx]
        if not known.any():
            continue
        o = out[a.name][known]
        if isinstance(a, ContinuousAttribute):
            term = F.mse_loss(o, vals[known].to(o))
        else:
            term = F.cross_entropy(o, vals[known].to(o.device))
        total = total + float((weights or {}).get(a.name, 1.0)) * term
    return total


def train_oracle(
    images: torch.Tensor,
    rows: Sequence[Mapping],
    encoder: AttributeEncoder | Sequence[Mapping],
    epochs: int = 20,
    batch_size: int = 16,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
    device: str | torch.device = "cpu",
    oracle: AttributeOracle | None = None,
    loss_weights: Mapping[str, float] | None = None,
    augmentation: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    cosine_lr: bool = False,
    **oracle_kwargs,
) -> AttributeOracle:
    """Train an :class:`AttributeOracle` on real images and their attributes (plain seeded Adam loop).

    Args:
        images: ``(N, C, H, W[, D])`` real images, preprocessed like the images the oracle will judge.
        rows: ``N`` attribute dicts (may be partial: missing attributes are left out of the loss).
        encoder: attribute specs.
        epochs, batch_size, lr, weight_decay: optimisation; loss = Σ MSE(continuous, normalised) + Σ CE(categorical).
        seed: seeds initialisation and shuffling (without touching the global RNG state).
        oracle: an existing oracle to continue training; otherwise one is built with ``oracle_kwargs``
            (``channels``, ``conv1_kernel``, ...), ``spatial_dims`` / ``in_channels`` taken from ``images``.
        loss_weights: per-attribute weights of the loss terms (1 when absent).
        augmentation: ``(batch, generator) -> batch`` applied to each training batch (e.g.
            :class:`~.oracle_training.Augmentation`), drawing from the loop's seeded generator.
        cosine_lr: anneal the learning rate to 0 over the run (cosine).

    Returns:
        the oracle in eval mode; ``oracle.history`` lists ``{"epoch", "loss"}``.
    """
    images = check_images(images, "training images")
    if len(rows) != images.shape[0]:
        raise EvaluationError(f"{images.shape[0]} images but {len(rows)} attribute rows")
    if images.shape[0] < 2:
        raise EvaluationError("train_oracle needs at least 2 images")
    encoder = _as_encoder(encoder)
    targets = attribute_targets(rows, encoder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if oracle is None:
            oracle = AttributeOracle(encoder, spatial_dims=images.ndim - 2, in_channels=images.shape[1], **oracle_kwargs)
        oracle.to(device)
        opt = torch.optim.Adam(oracle.parameters(), lr=lr, weight_decay=weight_decay)
        n = images.shape[0]
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs * math.ceil(n / batch_size), 1)) \
            if cosine_lr else None
        g = torch.Generator().manual_seed(seed)
        for epoch in range(epochs):
            oracle.train()
            perm = torch.randperm(n, generator=g)
            total, count = 0.0, 0
            for i in range(0, n, batch_size):
                idx = perm[i : i + batch_size]
                if idx.numel() < 2:  # BatchNorm needs > 1 sample per batch
                    idx = torch.cat([idx, perm[:1]])
                x = images[idx] if augmentation is None else augmentation(images[idx], g)
                out = oracle(x.to(device))
                loss = _oracle_loss(oracle, out, targets, idx, loss_weights)
                opt.zero_grad()
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
                total += float(loss.detach()) * idx.numel()
                count += idx.numel()
            oracle.history.append({"epoch": epoch + 1, "loss": total / max(count, 1)})
    oracle.eval()
    return oracle


@torch.no_grad()
def extract_features(feature_fn: FeatureExtractor | AttributeOracle, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Run a feature network over ``images`` ``(N, C, *spatial)`` in batches -> ``(N, F)`` on CPU.

    ``feature_fn`` is an :class:`AttributeOracle` (its :meth:`~AttributeOracle.features`) or any callable mapping
    ``(B, C, *spatial)`` to ``(B, F)``; other output shapes raise (pool spatial maps yourself, as MONAI's FID docs
    advise).
    """
    images = check_images(images, "images")
    if isinstance(feature_fn, AttributeOracle):
        return feature_fn.features(images, batch_size)
    if not callable(feature_fn):
        raise EvaluationError(f"feature_fn must be callable, got {type(feature_fn).__name__}")
    parts = []
    for i in range(0, images.shape[0], batch_size):
        chunk = images[i : i + batch_size]
        f = feature_fn(chunk)
        if not isinstance(f, torch.Tensor) or f.ndim != 2 or f.shape[0] != chunk.shape[0]:
            shape = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
            raise EvaluationError(f"feature network returned {shape} for a batch of {chunk.shape[0]}; expected (B, F)")
        parts.append(f.detach().float().cpu())
    return torch.cat(parts)
