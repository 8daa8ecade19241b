"""experiments.timing: statistics, ABBA order, warm-up / compile kept apart, the decode fit and its refusals,
the machine description. Fake clocks and synthetic timings only: no assertion on wall time."""

from __future__ import annotations

import math

import pytest

from experiments import timing as T


class FakeClock:
    """A clock that advances only when a fake workload says so."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def work(self, seconds: float):
        def f():
            self.now += seconds
        return f


def test_summarize_median_quartiles_spread():
    s = T.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s.n, s.median, s.min, s.max, s.q1, s.q3, s.iqr) == (5, 3.0, 1.0, 5.0, 2.0, 4.0, 2.0)
    s = T.summarize([1.0, 2.0, 3.0, 10.0])
    assert s.median == 2.5 and s.q1 == pytest.approx(1.75) and s.q3 == pytest.approx(4.75)
    assert T.summarize([0.0123]).fmt() == "12.3 [12.3-12.3]"
    with pytest.raises(ValueError):
        T.summarize([])


def test_abba_order():
    assert T.abba_orders(["A", "B"], 4) == [["A", "B"], ["B", "A"], ["A", "B"], ["B", "A"]]
    assert T.abba_orders([1, 2, 3], 2) == [[1, 2, 3], [3, 2, 1]]


def test_interleaved_calls_in_abba_order_and_keeps_warmup_apart():
    calls, clock = [], FakeClock()

    def side(name, first, steady):
        n = {"k": 0}

        def f():
            calls.append(name)
            clock.now += first if n["k"] == 0 else steady
            n["k"] += 1
        return f

    res = T.interleaved({"A": side("A", 5.0, 1.0), "B": side("B", 7.0, 2.0)}, repeats=4, clock=clock, cpu_clock=None)
    assert calls == ["A", "B"] + ["A", "B", "B", "A", "A", "B", "B", "A"]  # warm-up, then ABBA
    assert res["A"].first_s == 5.0 and res["B"].first_s == 7.0  # compile + first run, not in the samples
    assert res["A"].samples == [1.0] * 4 and res["B"].samples == [2.0] * 4
    assert res.ratio("B", "A").median == 2.0


def test_paired_ratio_survives_load_drift():
    """The machine gets 3x slower halfway: medians of each side move, per-round ratios do not."""
    clock, calls = FakeClock(), {"n": 0}

    def work(seconds):
        def f():
            rnd = calls["n"] // 2  # two calls per round
            calls["n"] += 1
            clock.now += seconds * (1.0 if rnd < 4 else 3.0)
        return f

    fa, fb = work(0.1), work(0.2)

    res = T.interleaved({"a": fa, "b": fb}, repeats=8, warmup=0, clock=clock, cpu_clock=None)
    r = res.ratio("a", "b")
    assert r.median == pytest.approx(0.5) and r.min == pytest.approx(0.5) and r.max == pytest.approx(0.5)


def test_measure_and_cpu_clock():
    clock, cpu = FakeClock(), FakeClock()

    def f():
        clock.now += 2.0
        cpu.now += 3.0  # two threads busy part of the time

    t = T.measure(f, repeats=3, clock=clock, cpu_clock=cpu)
    assert t.samples == [2.0] * 3 and t.cpu_samples == [3.0] * 3 and t.first_s == 2.0
    assert t.to_dict()["stats"]["median"] == 2.0 and t.to_dict()["cpu_stats"]["median"] == 3.0
    with pytest.raises(ValueError):
        T.measure(f, repeats=0)


def test_compile_seconds_times_lower_and_compile_apart():
    clock = FakeClock()

    class Lowered:
        def compile(self):
            clock.now += 4.0
            return "exe"

    class Jitted:
        def lower(self, *a, **k):
            assert a == (1,) and k == {"static": 2}
            clock.now += 1.5
            return Lowered()

    out = T.compile_seconds(Jitted(), 1, static=2, clock=clock)
    assert out == {"lower_s": 1.5, "compile_s": 4.0, "compiled": "exe"}


def test_least_squares_exact_line():
    slope, icpt, rms, r2 = T.least_squares([1, 2, 3, 4], [0.5 + 0.01 * n for n in (1, 2, 3, 4)])
    assert slope == pytest.approx(0.01) and icpt == pytest.approx(0.5) and rms == pytest.approx(0, abs=1e-12)
    assert r2 == pytest.approx(1.0)
    with pytest.raises(ValueError):
        T.least_squares([2, 2], [1.0, 2.0])


def test_fit_decode_recovers_slope_intercept_and_residual():
    """Synthetic generate() timings: 300 ms prefill + 9 ms/token, with +-1 ms alternating noise."""
    samples = {n: [0.3 + 0.009 * n + e for e in (0.001, -0.001, 0.001, -0.001)] for n in (9, 17, 33)}
    fit = T.fit_decode(samples)
    assert fit.ok and fit.problem is None
    assert fit.per_token_s == pytest.approx(0.009) and fit.intercept == pytest.approx(0.3)
    assert fit.residual_rms == pytest.approx(0.001) and 0.99 < fit.r2 <= 1.0
    assert fit.lengths == [9, 17, 33] and fit.n == 12
    assert fit.medians == pytest.approx([0.3 + 0.009 * n for n in (9, 17, 33)])
    d = fit.to_dict()
    assert d["per_token_s"] == pytest.approx(0.009) and d["problem"] is None


def test_fit_decode_refuses_negative_slope():
    """The old ``(generate(N+1) - generate(1)) / N`` gave -379 ms/token when load fell between the two runs;
    the fit refuses instead of reporting it."""
    fit = T.fit_decode({1: [3.5, 3.4], 9: [0.5, 0.6]})
    assert not fit.ok and fit.per_token_s is None and "non-positive slope" in fit.problem
    assert fit.slope < 0  # kept for the record, never reported as a rate


def test_fit_decode_refuses_non_monotone_and_degenerate():
    fit = T.fit_decode({4: [1.0], 8: [1.5], 12: [1.2], 16: [2.0]})
    assert fit.slope > 0 and not fit.ok and "non-monotone" in fit.problem and fit.per_token_s is None
    for bad in ({8: [1.0, 1.1]}, {8: [1.0], 16: []}, {}):
        f = T.fit_decode(bad)
        assert not f.ok and f.per_token_s is None and "degenerate" in f.problem


def test_fit_from_interleaved_keys():
    clock = FakeClock()
    fns = {("jax", n): clock.work(0.1 + 0.01 * n) for n in (2, 6, 10)}
    fns.update({("torch", n): clock.work(0.2 + 0.02 * n) for n in (2, 6, 10)})
    res = T.interleaved(fns, repeats=3, clock=clock, cpu_clock=None)
    assert T.fit_from(res, "jax").per_token_s == pytest.approx(0.01)
    assert T.fit_from(res, "torch").per_token_s == pytest.approx(0.02)
    only = T.interleaved({n: clock.work(0.5 + 0.003 * n) for n in (4, 8)}, repeats=2, clock=clock, cpu_clock=None)
    assert T.fit_from(only).per_token_s == pytest.approx(0.003)


def test_decode_lengths():
    assert T.decode_lengths(32) == [8, 20, 33]
    assert T.decode_lengths(16) == [4, 10, 17]
    assert T.decode_lengths(2) == [2, 3]
    assert all(n >= 2 for n in T.decode_lengths(1)) or T.decode_lengths(1) == [1, 2]


CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse sse2 avx avx2 fma
processor\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse sse2 avx avx2 fma
"""


def test_cpu_info_flags():
    c = T.cpu_info(CPUINFO)
    assert c["model"] == "AMD EPYC 7B13" and c["vendor"] == "AuthenticAMD"
    assert c["isa"]["avx2"] and not c["isa"]["avx512f"] and c["widest_simd"] == "AVX2"
    c = T.cpu_info(CPUINFO.replace("avx2 fma", "avx2 fma avx512f avx512bw"))
    assert c["widest_simd"] == "AVX-512" and c["isa"]["avx512bw"]


def test_wait_for_quiet_polls_then_gives_up_or_passes():
    loads = iter([2.0, 1.5, 0.4])
    slept = []
    out = T.wait_for_quiet(0.6, timeout_s=600, poll_s=60, snapshot=lambda: {"loadavg": [next(loads), 0, 0]},
                           sleep=slept.append)
    assert out["quiet"] and out["waited_s"] == 120 and slept == [60, 60]
    out = T.wait_for_quiet(0.6, timeout_s=120, poll_s=60, snapshot=lambda: {"loadavg": [3.0, 0, 0]},
                           sleep=lambda s: None)
    assert not out["quiet"] and out["waited_s"] == 120


def test_header_lines_name_machine_flags_and_load():
    env = {"cpu": T.cpu_info(CPUINFO), "os": "Linux x", "threads": {"env": {}, "torch_threads": 2,
                                                                     "torch_interop_threads": 2},
           "versions": {"python": "3.11", "jax": "0.10.2"}}
    load = {"before": {"loadavg": [0.3, 0.5, 0.7], "cpu_pressure_avg10": 1.0},
            "after": {"loadavg": [0.9, 0.6, 0.7], "cpu_pressure_avg10": 3.0}, "max_load1": 1.1}
    text = "\n".join(T.header_lines(env, load, {"quiet": True, "waited_s": 0, "threshold": 0.6}))
    for s in ("AMD EPYC 7B13", "avx2 yes", "avx512f no", "torch 2 intra-op", "0.30/0.50/0.70", "max 1-min during 1.10",
              "passed", "jax 0.10.2"):
        assert s in text, s
    snap = T.load_snapshot()  # the real files: present on Linux, None elsewhere; never an error
    assert set(snap) >= {"loadavg", "cpu_pressure_avg10", "time"}
    assert snap["loadavg"] is None or (len(snap["loadavg"]) == 3 and all(not math.isnan(x) for x in snap["loadavg"]))


def test_shorten_notes_keeps_the_command_readable():
    assert T.shorten_notes(["--out", "x", "--note", "a long paragraph", "--repeats", "3"]) == [
        "--out", "x", "--note", '"..."', "--repeats", "3"]


def test_fmt_fit_prints_the_intercept_with_its_sign():
    up = T.fit_decode({4: [0.050, 0.051], 8: [0.090, 0.091]})       # 10 ms/token, +10 ms
    assert T.fmt_fit(up).startswith("10.00 (+10.5")
    down = T.fit_decode({4: [0.036, 0.036], 8: [0.076, 0.076]})      # 10 ms/token, -4 ms: noise-level fit
    assert T.fmt_fit(down).startswith("10.00 (-4.0") and "+-" not in T.fmt_fit(down)
    assert T.fmt_fit(T.fit_decode({4: [0.05], 8: [0.04]})).startswith("refused (non-positive slope")
