"""monai_ld: Latent Drifting (LD) counterfactuals for medical images, built on MONAI."""

from .conditioning import NULL_VALUE, AttributeEncoder, CategoricalAttribute, ConditionError, ContinuousAttribute

__version__ = "0.1.0"
