"""Preprocessing for Latent Drifting: 3D brain-MRI and 2D chest-X-ray chains, validation, attribute encoding,
inversion back to the input space, and torchio interop. Array transform ``Foo`` + dictionary transform ``Food``."""

from monai_ld.transforms.attributes import EncodeAttributes, EncodeAttributesd
from monai_ld.transforms.chains import ForegroundAbove, PreprocessCompose, brain_mri_transforms, chest_xray_transforms
from monai_ld.transforms.intensity import (
    INTENSITY_RANGE_KEY,
    InvertMonochrome1,
    InvertMonochrome1d,
    N4BiasFieldCorrection,
    N4BiasFieldCorrectiond,
    RecordedPercentileScale,
    RecordedPercentileScaled,
    ToGrayscale,
    ToGrayscaled,
    photometric_interpretation,
)
from monai_ld.transforms.inverse import restore_to_input_space
from monai_ld.transforms.io import ACCEPTED_FORMATS, ImageLoadError, LoadMedicalImage, LoadMedicalImaged, save_like_input, select_reader
from monai_ld.transforms.spatial import ExtractSlice, ExtractSliced
from monai_ld.transforms.torchio_bridge import TorchIOSubjectd, dict_to_subject, subject_to_dict
from monai_ld.transforms.validation import ImageValidationError, ValidateImage, ValidateImaged

__all__ = [
    "ACCEPTED_FORMATS",
    "INTENSITY_RANGE_KEY",
    "EncodeAttributes",
    "EncodeAttributesd",
    "ExtractSlice",
    "ExtractSliced",
    "ForegroundAbove",
    "ImageLoadError",
    "ImageValidationError",
    "InvertMonochrome1",
    "InvertMonochrome1d",
    "LoadMedicalImage",
    "LoadMedicalImaged",
    "N4BiasFieldCorrection",
    "N4BiasFieldCorrectiond",
    "PreprocessCompose",
    "RecordedPercentileScale",
    "RecordedPercentileScaled",
    "ToGrayscale",
    "ToGrayscaled",
    "TorchIOSubjectd",
    "ValidateImage",
    "ValidateImaged",
    "brain_mri_transforms",
    "chest_xray_transforms",
    "dict_to_subject",
    "photometric_interpretation",
    "restore_to_input_space",
    "save_like_input",
    "select_reader",
    "subject_to_dict",
]
