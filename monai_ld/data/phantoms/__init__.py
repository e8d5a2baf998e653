"""Phantom generators with exact ground-truth counterfactuals, built from real anatomy.

- :class:`BrainPhantom`: 3D T1 brain MRI (MNI ICBM152 template) with ``age``, ``sex``, ``diagnosis``.
- :class:`ChestXrayPhantom`: 2D chest radiographs rendered from a segmented chest CT with ``sex``, ``age``,
  ``cardiomegaly``, ``pleural_effusion``, ``pneumonia``.

Same identity + different attributes = the exact counterfactual (identity randomness is seeded by the identity).
"""

from .brain import BRAIN_LABELS, BrainIdentity, BrainPhantom, PhantomRender, brain_attribute_encoder
from .cxr import CXR_LABELS, ChestXrayPhantom, CxrIdentity, cxr_attribute_encoder
from .writer import PHANTOM_KINDS, get_phantom, write_phantom_dataset

__all__ = [
    "BRAIN_LABELS", "BrainIdentity", "BrainPhantom", "PhantomRender", "brain_attribute_encoder",
    "CXR_LABELS", "ChestXrayPhantom", "CxrIdentity", "cxr_attribute_encoder",
    "PHANTOM_KINDS", "get_phantom", "write_phantom_dataset",
]
