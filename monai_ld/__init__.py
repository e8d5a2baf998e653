"""monai_ld: Latent Drifting (LD) counterfactuals for medical images, built on MONAI.

The public names below load their module on first use: every ``monai_ld.<module>`` import runs this file first, so an
eager import here would pull the upper layers (pipeline, bundle support) into every lower one, and ``import
monai_ld`` would cost torch and MONAI before anything is used. Submodules load the same way on attribute access
(``monai_ld.bundle_support``; bundle configs' ``$from monai_ld import bundle_support`` is such an access).
"""

import importlib as _importlib
import logging as _logging
import warnings as _warnings

# MONAI 1.6 announces at every DICOM-capable reader that nvImageCodec (a CUDA decoder) is absent and that it falls
# back to pydicom's decoders: expected on a CPU machine and nothing a user must act on.
_logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(_logging.ERROR)
_warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader: nvImageCodec decoder plugin did not register")

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    **dict.fromkeys(("NULL_VALUE", "AttributeEncoder", "CategoricalAttribute", "ConditionError", "ContinuousAttribute"),
                    "conditioning"),
    **dict.fromkeys(("DriftedScheduler", "DriftTarget", "apply_step_drift", "drift_noise", "forward_drift",
                     "with_drift"), "drift"),
    **dict.fromkeys(("Abduction", "Composition", "CounterfactualOutput", "InversionOutput", "LatentDriftInferer"),
                    "inferers"),
    "ConditionalLDM": "networks",
    "EditSettings": "settings",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(_importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    elif not name.startswith("__"):
        # a submodule: MONAI's config parser resolves `$from monai_ld import bundle_support` with getattr
        try:
            value = _importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
