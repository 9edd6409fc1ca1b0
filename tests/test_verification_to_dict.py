"""Every public result of verification has ``to_dict()``: JSON builtins, strict JSON (no NaN), the same numbers."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

import submod
import verification as vf
from verification import strategies as vst
from verification.decay import BoundCurve
from verification.guarantee import GuaranteeRow

_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _same(read: object, original: object, where: str) -> None:
    """``read`` (from JSON) holds what ``original`` holds: arrays and tuples as lists, non-finite floats by name."""
    if dataclasses.is_dataclass(original):
        _check_fields(read, original, where)
    elif isinstance(original, dict):
        assert isinstance(read, dict) and set(read) == {str(k) for k in original}, where
        for key, value in original.items():
            _same(read[str(key)], value, f"{where}[{key!r}]")
    elif isinstance(original, (np.ndarray, list, tuple)):
        items = list(original)   # an array by its first axis: rows of a 2-D one are compared in turn
        assert isinstance(read, list) and len(read) == len(items), where
        for i, (r, o) in enumerate(zip(read, items, strict=True)):
            _same(r, o, f"{where}[{i}]")
    elif isinstance(original, (bool, np.bool_)) or original is None:
        assert read == (None if original is None else bool(original)) and type(read) is type(
            None if original is None else True), where
    elif isinstance(original, (int, np.integer)):
        assert type(read) is int and read == int(original), where
    elif isinstance(original, (float, np.floating)):
        value = _NONFINITE[read] if isinstance(read, str) else read
        assert isinstance(value, float), where
        assert (math.isnan(value) and math.isnan(original)) or value == float(original), where
    else:
        assert read == str(original), where


def _check_fields(d: dict, obj: object, where: str, derived: tuple[str, ...] = ()) -> None:
    names = [f.name for f in dataclasses.fields(obj)] + list(derived)
    assert set(names) <= set(d), f"{where}: missing {set(names) - set(d)}"
    for name in names:
        _same(d[name], getattr(obj, name), f"{where}.{name}")


def _round_trip(obj: object) -> dict:
    text = json.dumps(obj.to_dict(), allow_nan=False)   # strict JSON: no NaN or infinity literal
    return json.loads(text)


def test_every_result_class_round_trips_through_strict_json(tmp_path):
    data = vst.suppressor_data()
    f = submod.SparseRegression(data.A, data.Y)
    res = submod.maximize(f, 2)
    ratios = [vf.submodularity_ratio(f, 2, res.selected, method=m, seed=0) for m in ("exact", "spectral", "sampled")]
    ratios.append(vf.submodularity_ratio(f, 2, method="greedy-path", result=res))
    cert = vf.certify(f, res, ratios[1])
    guarantee = vf.check_guarantee(f, 2, n_seeds=2)
    decay = vf.error_decay(f)
    rep = vf.report(f, 2, tmp_path, figures=False)
    for obj, derived in [*((r, ("sound_lower",)) for r in ratios), (cert, ("ratio",)), (guarantee, ("all_hold",)),
                         (decay, ("relative_errors", "all_hold")), (rep, ())]:
        d = _round_trip(obj)
        _check_fields(d, obj, type(obj).__name__, derived)
    for row in guarantee.rows:
        assert isinstance(row, GuaranteeRow)
        _check_fields(_round_trip(row), row, "GuaranteeRow")
    for curve in decay.bounds:
        assert isinstance(curve, BoundCurve)
        _check_fields(_round_trip(curve), curve, "BoundCurve")
    assert _round_trip(rep)["path"] == str(rep.path)


def test_non_finite_numbers_become_their_names():
    """An infinite path ratio (x / 0) and a NaN survive strict JSON as "inf" and "nan", which float() reads back."""
    est = vf.RatioEstimate(value=0.5, kind="upper bound", method="greedy-path", k=2, U=(0, 1),
                           parameters={"seed": np.int64(3)},
                           details={"path_ratios": np.array([0.5, np.inf, -np.inf, np.nan]), "none": None})
    d = _round_trip(est)
    assert d["details"]["path_ratios"][1:] == ["inf", "-inf", "nan"]
    assert [float(v) for v in d["details"]["path_ratios"][:3]] == [0.5, math.inf, -math.inf]
    assert d["parameters"]["seed"] == 3 and d["U"] == [0, 1] and d["details"]["none"] is None
    assert d["sound_lower"] is False
    with pytest.raises(TypeError, match="cannot convert"):
        vf.RatioEstimate(value=0.5, kind="upper bound", method="x", k=1, U=None, details={"f": object()}).to_dict()
