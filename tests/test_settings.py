"""EditSettings: one validation, one alias table (old checkpoints and habits), CLI flags derived from the fields."""

import argparse

import pytest

from monai_ld.settings import EditSettings


def test_old_names_are_read_and_the_new_ones_written():
    # a checkpoint trained before the rename carries meta["defaults"]["guidance"]
    s = EditSettings.from_mapping({"guidance": 1.0, "steps": 25, "composition": "Paired"})
    assert (s.guidance_scale, s.num_inference_steps, s.composition) == (1.0, 25, "paired")
    assert "guidance" not in s.asdict() and s.asdict()["guidance_scale"] == 1.0
    assert EditSettings.given({"guidance": "none", "seed": None}) == {"guidance_scale": "none"}
    # None = not given (the base's value); "none" = off
    assert s.update(guidance_scale=None).guidance_scale == 1.0 and s.update(guidance_scale="none").guidance_scale is None
    with pytest.raises(ValueError, match="given twice"):
        EditSettings.from_mapping({"guidance": 1.0, "guidance_scale": 2.0})


@pytest.mark.parametrize("given, message", [
    ({"strength": 1.5}, r"strength must be a number in \[0.0, 1.0\], got 1.5"),
    ({"mask_threshold": 1.0}, r"mask_threshold must be a number in \(0.0, 1.0\) or 'none'"),
    ({"composition": "blend"}, "composition must be one of none, residual, paired"),
    ({"num_inference_steps": "many"}, "num_inference_steps: expected an integer >= 1"),
    ({"guidence": 3}, "unknown setting.*guidence.*accepted: drift.*guidance -> guidance_scale"),
    ({"samples": 4, "abduction": "inversion"}, "samples > 1 need a stochastic abduction"),
])
def test_bad_settings_name_the_key_and_what_is_accepted(given, message):
    with pytest.raises(ValueError, match=message):
        EditSettings.from_mapping(given)


def test_samples_switch_a_default_inversion_to_noising():
    assert EditSettings.from_mapping(samples=4).abduction == "noising"


def test_cli_flags_come_from_the_fields():
    p = argparse.ArgumentParser()
    EditSettings.add_arguments(p)
    args = p.parse_args(["--guidance", "2", "--steps", "7", "--mask-threshold", "none", "--output-space", "model"])
    assert EditSettings.from_args(args) == {"guidance_scale": 2.0, "num_inference_steps": 7, "mask_threshold": "none",
                                            "output_space": "model"}
    assert EditSettings.from_args(p.parse_args(["--guidance-scale", "4", "--num-inference-steps", "3"])) == \
        {"guidance_scale": 4.0, "num_inference_steps": 3}
    assert "classifier-free guidance" in p.format_help()
