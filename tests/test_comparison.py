import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from onnxforge.comparison import compare_outputs
from onnxforge.errors import OnnxforgeError


def _rng():
    return np.random.default_rng(0)


def test_identical_outputs_are_exact():
    runs = [{"y": _rng().standard_normal((4, 10)).astype(np.float32)}]

    result = compare_outputs(runs, runs)

    assert result.max_abs == 0.0
    assert result.max_rel == 0.0
    assert result.min_cosine == pytest.approx(1.0)
    assert result.min_top1_agreement == 1.0
    assert result.within(0.0)


def test_perturbation_is_relative_to_output_scale():
    ref = np.array([[10.0, -20.0, 5.0]], dtype=np.float32)
    cand = ref + np.array([[0.2, 0.0, 0.0]], dtype=np.float32)

    out = compare_outputs([{"y": ref}], [{"y": cand}]).outputs[0]

    assert out.max_abs == pytest.approx(0.2, rel=1e-5)
    assert out.max_rel == pytest.approx(0.2 / 20.0, rel=1e-5)
    assert out.mismatch_fraction is None
    assert out.within(0.011)
    assert not out.within(0.009)


def test_metrics_take_worst_run():
    ref = np.ones((2, 3), dtype=np.float32)
    runs_ref = [{"y": ref}, {"y": ref}]
    runs_cand = [{"y": ref}, {"y": -ref}]

    result = compare_outputs(runs_ref, runs_cand)

    assert result.max_abs == pytest.approx(2.0)
    assert result.max_rel == pytest.approx(2.0)
    assert result.min_cosine == pytest.approx(-1.0)


def test_cosine_is_one_when_both_are_zero_and_zero_when_one_is():
    zeros = np.zeros((3,), dtype=np.float32)

    assert compare_outputs([{"y": zeros}], [{"y": zeros}]).min_cosine == 1.0
    assert compare_outputs([{"y": zeros}], [{"y": zeros + 1}]).min_cosine == 0.0


def test_nan_at_same_positions_counts_as_equal():
    ref = np.array([1.0, np.nan, np.inf, 3.0], dtype=np.float32)

    result = compare_outputs([{"y": ref}], [{"y": ref.copy()}])

    assert result.max_abs == 0.0
    assert result.within(0.0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_in_one_side_only_fails(bad):
    ref = np.array([1.0, 2.0, np.inf], dtype=np.float32)
    cand = ref.copy()
    cand[1] = bad
    if bad == np.inf:
        cand[2] = -np.inf  # an infinity of the other sign

    result = compare_outputs([{"y": ref}], [{"y": cand}])

    assert math.isinf(result.max_rel)
    assert not result.within(1e6)


def test_integer_outputs_compare_exactly():
    ref = np.array([[1, 2, 3, 4]], dtype=np.int64)
    cand = np.array([[1, 2, 3, 5]], dtype=np.int64)

    out = compare_outputs([{"idx": ref}], [{"idx": cand}]).outputs[0]

    assert out.mismatch_fraction == 0.25
    assert out.cosine is None
    assert out.top1_agreement is None
    assert not out.within(1.0)
    assert out.within(1.0, mismatch_tol=0.25)


def test_bool_outputs_compare_exactly():
    ref = np.array([True, False, True, True])

    out = compare_outputs([{"m": ref}], [{"m": ~ref}]).outputs[0]

    assert out.mismatch_fraction == 1.0


def test_string_outputs_compare_exactly():
    ref = np.array(["a", "b"], dtype=object)
    cand = np.array(["a", "c"], dtype=object)

    out = compare_outputs([{"s": ref}], [{"s": cand}]).outputs[0]

    assert out.mismatch_fraction == 0.5
    assert math.isinf(out.max_rel)


def test_top1_agreement_counts_rows_whose_argmax_agrees():
    ref = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.0, 0.0, 1.0]], dtype=np.float32)
    cand = ref.copy()
    cand[0] = [0.9, 0.1, 0.0]  # row 0 flips its top class

    out = compare_outputs([{"logits": ref}], [{"logits": cand}]).outputs[0]

    assert out.top1_agreement == 0.75


def test_top1_agreement_pools_rows_over_runs_and_leading_axes():
    ref = np.zeros((2, 2, 3), dtype=np.float32)
    ref[..., 0] = 1.0
    cand = ref.copy()
    cand[1, 1] = [0.0, 0.0, 1.0]

    result = compare_outputs([{"y": ref}, {"y": ref}], [{"y": ref}, {"y": cand}])

    assert result.min_top1_agreement == pytest.approx(7 / 8)


def test_top1_agreement_is_none_for_rank_one():
    y = np.arange(5, dtype=np.float32)

    assert compare_outputs([{"y": y}], [{"y": y}]).outputs[0].top1_agreement is None


def test_outputs_are_matched_by_name_regardless_of_order():
    a = np.ones(3, dtype=np.float32)
    b = np.zeros(3, dtype=np.float32)

    result = compare_outputs([{"a": a, "b": b}], [{"b": b, "a": a}])

    assert [o.name for o in result.outputs] == ["a", "b"]
    assert result.max_abs == 0.0


def test_outputs_with_other_names_are_matched_by_position():
    a = np.ones(3, dtype=np.float32)
    b = np.zeros(3, dtype=np.float32)

    result = compare_outputs([{"a": a, "b": b}], [{"a_opt": a, "b_opt": b + 0.5}])

    assert [o.name for o in result.outputs] == ["a", "b"]
    assert result.outputs[0].max_abs == 0.0
    assert result.outputs[1].max_abs == pytest.approx(0.5)


def test_different_output_counts_raise_user_error():
    a = np.ones(3, dtype=np.float32)

    with pytest.raises(OnnxforgeError, match="outputs"):
        compare_outputs([{"a": a, "b": a}], [{"c": a}])


def test_shape_mismatch_fails_the_comparison():
    result = compare_outputs([{"y": np.ones((2, 3))}], [{"y": np.ones((3, 2))}])

    assert result.shape_mismatch
    assert math.isinf(result.max_rel)
    assert not result.within(1e9)


def test_fp16_candidate_is_compared_in_float():
    ref = _rng().standard_normal((8, 8)).astype(np.float32)

    result = compare_outputs([{"y": ref}], [{"y": ref.astype(np.float16)}])

    assert 0 < result.max_rel < 1e-3
    assert result.min_cosine > 0.9999


def test_to_dict_summarises_worst_case_and_each_output():
    y = np.ones((2, 2), dtype=np.float32)

    as_dict = compare_outputs([{"y": y}], [{"y": y * 1.5}]).to_dict()

    assert as_dict["max_rel"] == pytest.approx(0.5)
    assert as_dict["outputs"][0]["name"] == "y"
    assert as_dict["shape_mismatch"] is False


def test_empty_run_lists_compare_as_nothing():
    assert compare_outputs([], []).outputs == []


@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3), elements=st.floats(width=32)))
def test_any_float_array_equals_itself(array):
    result = compare_outputs([{"y": array}], [{"y": array.copy()}])

    assert result.within(0.0)
