"""monai_ld: Latent Drifting (LD) counterfactuals for medical images, built on MONAI."""

import logging as _logging
import warnings as _warnings

# MONAI 1.6 announces at every DICOM-capable reader that nvImageCodec (a CUDA decoder) is absent and that it falls
# back to pydicom's decoders: expected on a CPU machine and nothing a user must act on.
_logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(_logging.ERROR)
_warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader: nvImageCodec decoder plugin did not register")

from .conditioning import NULL_VALUE, AttributeEncoder, CategoricalAttribute, ConditionError, ContinuousAttribute
from .drift import DriftedScheduler, DriftTarget, apply_step_drift, drift_noise, forward_drift, with_drift
from .inferers import Abduction, Composition, CounterfactualOutput, InversionOutput, LatentDriftInferer
from .networks import ConditionalLDM
from . import bundle_support  # noqa: E402  (bundle configs import it as `from monai_ld import bundle_support`)

__version__ = "0.1.0"
