import pytest
import torch

from monai_ld import NULL_VALUE, AttributeEncoder, CategoricalAttribute, ConditionError, ContinuousAttribute


@pytest.fixture
def enc():
    return AttributeEncoder(
        [ContinuousAttribute("age", 40, 95, "years"), CategoricalAttribute("sex", ("F", "M")),
         CategoricalAttribute("diagnosis", ("CN", "MCI", "AD"))]
    )


def test_encode_layout_and_roundtrip(enc):
    code = enc.encode({"age": 95, "sex": "m", "diagnosis": "AD"})
    assert enc.dim == 6
    assert torch.equal(code, torch.tensor([1.0, 0, 1, 0, 0, 1]))
    assert enc.decode(code) == {"age": 95.0, "sex": "M", "diagnosis": "AD"}
    assert enc.encode({"age": "67.5", "sex": 0, "diagnosis": 1})[0] == pytest.approx(0.5)


def test_context_and_null(enc):
    ctx = enc.context([{"age": 50, "sex": "F", "diagnosis": "CN"}, None])
    assert ctx.shape == (2, 1, 6)
    assert enc.is_null(ctx).tolist() == [False, True]
    assert (enc.context(None, batch_size=3) == NULL_VALUE).all()
    spatial = enc.to_spatial(ctx, (4, 5, 6))
    assert spatial.shape == (2, 6, 4, 5, 6) and spatial[0, 0, 3, 4, 5] == ctx[0, 0, 0]


def test_condition_dropout(enc):
    codes = enc.encode_batch([{"age": 60, "sex": "F", "diagnosis": "CN"}] * 1000)
    dropped = enc.drop(codes, 0.25, generator=torch.Generator().manual_seed(0))
    frac = enc.is_null(dropped).float().mean().item()
    assert 0.2 < frac < 0.3
    assert torch.equal(enc.drop(codes, 0.0), codes)


@pytest.mark.parametrize(
    "values, fragment",
    [
        ({"age": 120, "sex": "F", "diagnosis": "CN"}, "'age': 120 is out of range; accepted: a number in [40, 95] years"),
        ({"age": 70, "sex": "X", "diagnosis": "CN"}, "unknown class 'X'; accepted: one of F, M"),
        ({"age": 70, "sex": "F"}, "missing attribute(s) 'diagnosis'"),
        ({"age": 70, "sex": "F", "diagnosis": "AD", "bmi": 3}, "unknown attribute(s) 'bmi'"),
        ({"age": "old", "sex": "F", "diagnosis": "AD"}, "'old' is not a number"),
        ({"age": float("nan"), "sex": "F", "diagnosis": "AD"}, "out of range"),
        ({"age": 70, "sex": 2, "diagnosis": "AD"}, "invalid value 2"),
    ],
)
def test_bad_values_raise_one_clear_error(enc, values, fragment):
    with pytest.raises(ConditionError) as e:
        enc.encode(values)
    assert fragment in str(e.value)
    assert "Accepted attributes:" in str(e.value)


def test_partial_validation_and_config_roundtrip(enc):
    assert enc.validate({"age": 80}, partial=True) == {"age": 80.0}
    again = AttributeEncoder.from_config(enc.to_config())
    assert again.names == enc.names and again.dim == enc.dim
    with pytest.raises(ConditionError, match="low < high"):
        ContinuousAttribute("age", 90, 40)
    with pytest.raises(ConditionError, match="duplicate"):
        AttributeEncoder([ContinuousAttribute("a", 0, 1), ContinuousAttribute("a", 0, 2)])
