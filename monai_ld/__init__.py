"""monai_ld: Latent Drifting (LD) counterfactuals for medical images, built on MONAI."""

from .conditioning import NULL_VALUE, AttributeEncoder, CategoricalAttribute, ConditionError, ContinuousAttribute
from .drift import DriftedScheduler, DriftTarget, apply_step_drift, drift_noise, forward_drift, with_drift
from .inferers import Abduction, Composition, CounterfactualOutput, InversionOutput, LatentDriftInferer
from .networks import ConditionalLDM
from . import bundle_support  # noqa: E402  (bundle configs import it as `from monai_ld import bundle_support`)

__version__ = "0.1.0"
