"""How `trainwire.read`'s run search reads hyperparameters: nested ones by dotted name, a filter by value or by a set
of values (a flag never equal to a count), and a hyperparameter of mixed types across runs still one column."""

import pyarrow as pa

from trainwire.read import _column, _flat, _has_params


def test_nested_hyperparameters_are_named_with_dots():
    assert _flat({"lr": 2e-4, "lora": {"r": 16, "target": ["q", "v"], "extra": {}}}) == {
        "lr": 2e-4, "lora.r": 16, "lora.target": ["q", "v"], "lora.extra": {}}


def test_a_filter_keeps_equal_values_or_any_of_a_set():
    logged = _flat({"lr": 2e-4, "lora": {"r": 16}, "packing": True})
    assert _has_params(logged, {"lr": 2e-4, "lora.r": 16})
    assert _has_params(logged, {"lr": {1e-4, 2e-4}})
    assert not _has_params(logged, {"lr": 1e-4})
    assert not _has_params(logged, {"lr": {1e-4, 3e-4}})
    assert not _has_params(logged, {"warmup": 0})  # a run without it is not a run with 0
    assert not _has_params(logged, {"packing": 1}) and not _has_params(_flat({"epochs": 1}), {"epochs": True})
    assert _has_params(logged, {"packing": True})


def test_a_hyperparameter_of_one_type_keeps_it_and_of_mixed_types_becomes_text():
    assert _column([2e-4, None, 1e-4]).type == pa.float64()
    mixed = _column([2e-4, "auto", None, [1, 2]])
    assert mixed.type == pa.string() and mixed.to_pylist() == ["0.0002", "auto", None, "[1, 2]"]
