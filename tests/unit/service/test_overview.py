"""What the dashboard may show of an estimate record (issue 29,
``streams.service.overview.reading``): no number before a unit matured in both
arms, the lift only where the control mean's interval excludes 0, and why the
adjustment is unavailable."""

from streams.service.overview import reading


def _rec(matured: dict, base: dict | None, adjustment="stratified", D=3, strata=2) -> dict:
    part = {"effect": {"mean": 0.1, "sd": 0.05, "lo": 0.0, "hi": 0.2},
            "lift": {"mean": 0.05, "sd": 0.02, "lo": 0.0, "hi": 0.1}, "p_positive": 0.97}
    if base is not None:
        part["baseline"] = base
    return {"control": "control", "variant": "treatment", "adjustment": adjustment,
            "units": {"exposed": {"control": 10, "treatment": 10}, "matured": matured},
            "watermark": {"event_time": 1, "completed_buckets": D},
            "strata": [{"n_exposed": 5} for _ in range(strata)],
            "adjusted": dict(part), "naive": dict(part)}


POS = {"mean": 2.0, "sd": 0.1, "lo": 1.8, "hi": 2.2}


def test_defect_no_matured_units_means_no_numbers():
    rd = reading(_rec({"control": 0, "treatment": 0}, POS))
    assert rd["has_data"] is False
    assert rd["lift_note"] == {"adjusted": "no matured units yet", "naive": "no matured units yet"}
    # one arm without a matured unit is no data either
    assert reading(_rec({"control": 4, "treatment": 0}, POS))["has_data"] is False


def test_lift_only_where_the_control_mean_excludes_zero():
    assert reading(_rec({"control": 4, "treatment": 4}, POS))["lift_note"] == {
        "adjusted": None, "naive": None}
    straddles = {"mean": 0.1, "sd": 1.0, "lo": -1.9, "hi": 2.0}
    note = reading(_rec({"control": 4, "treatment": 4}, straddles))["lift_note"]["adjusted"]
    assert note and "includes 0" in note
    # a record without the baseline (written before it) shows no lift
    assert reading(_rec({"control": 4, "treatment": 4}, None))["lift_note"]["adjusted"]


def test_adjustment_unavailable_says_why():
    d0 = reading(_rec({"control": 4, "treatment": 4}, POS, "unavailable", D=0))
    assert "D = 0" in d0["adjustment_note"]
    one = reading(_rec({"control": 4, "treatment": 4}, POS, "unavailable", D=2, strata=1))
    assert "one activity stratum" in one["adjustment_note"]
    assert reading(_rec({"control": 4, "treatment": 4}, POS))["adjustment_note"] is None
