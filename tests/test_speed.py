"""Side-by-side speed comparison: interleaved runs, a ratio only when the timings support it."""

from __future__ import annotations

import json

import pytest
from conftest import make_char_tokenizer, make_tiny_model

from optipfair_train.speed import NO_CHANGE, compare_speed, compare_timings, speed_line


class FakeTimer:
    """Returns timestamps so that the k-th run (in call order) takes ``durations[k]`` = (prefill, decode)."""

    def __init__(self, durations: list[tuple[float, float]]):
        self.stamps, now = [], 0.0
        for prefill, decode in durations:
            self.stamps += [now, now + prefill, now + prefill + decode]
            now += prefill + decode + 1.0

    def __call__(self) -> float:
        return self.stamps.pop(0)


def _interleave(base: list[tuple[float, float]], final: list[tuple[float, float]]) -> list[tuple[float, float]]:
    runs = [(9.0, 9.0), (9.0, 9.0)]  # warm-up of base, then of final: ignored
    for b, f in zip(base, final, strict=True):
        runs += [b, f]
    return runs


def _compare(base, final, repeats):
    model, tokenizer = make_tiny_model(seed=0), make_char_tokenizer()
    timer = FakeTimer(_interleave(base, final))
    result = compare_speed(model, make_tiny_model(seed=1), tokenizer, repeats=repeats, max_new_tokens=4, timer=timer)
    assert timer.stamps == []  # every run was timed, in the A B A B order
    return result


def test_noise_only_gives_no_measurable_change():
    base = [(0.10, 1.00), (0.12, 1.05), (0.09, 0.97), (0.11, 1.02), (0.10, 0.99)]
    final = [(0.11, 0.98), (0.10, 1.03), (0.12, 1.01), (0.09, 0.96), (0.10, 1.04)]
    result = _compare(base, final, repeats=5)
    for key in ("prefill", "decode"):
        assert result[key]["verdict"] == NO_CHANGE and not result[key]["separated"]
    assert result["decode"]["base_seconds"] == pytest.approx([1.00, 1.05, 0.97, 1.02, 0.99])
    line = speed_line(result)
    assert "faster" not in line and "slower" not in line and line.count(NO_CHANGE) == 2  # no ratio printed
    json.dumps(result)  # the card and the state file take it as it is


def test_separated_timings_give_the_ratio():
    base = [(0.10, 1.00), (0.10, 1.10), (0.10, 1.04), (0.10, 1.02), (0.10, 1.06)]
    final = [(0.10, 0.80), (0.10, 0.82), (0.10, 0.85), (0.10, 0.81), (0.10, 0.79)]
    result = _compare(base, final, repeats=5)
    decode = result["decode"]
    assert decode["separated"] and decode["ratio"] == pytest.approx(1.04 / 0.81)
    assert decode["verdict"] == "x1.28 faster"
    assert decode["base_tokens_per_second"] == pytest.approx(4 / 1.04)
    assert decode["false_alarm_rate"] == pytest.approx(2 / 252)
    assert result["prefill"]["verdict"] == NO_CHANGE  # identical prefill times overlap
    assert result["repeats"] == 5 and result["threads"] >= 1 and len(result["load_before"]) == 3
    assert "decode x1.28 faster" in result["summary"] and "5 interleaved runs per model" in result["summary"]


def test_slower_final_model_and_bad_input():
    assert compare_timings([1.0, 1.1], [2.0, 2.2], tokens=4)["verdict"] == "x2.00 slower"
    with pytest.raises(ValueError, match="repeats must be an integer >= 2"):
        compare_speed(make_tiny_model(), make_tiny_model(), make_char_tokenizer(), repeats=1)
