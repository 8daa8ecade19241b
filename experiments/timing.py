"""The one timing method of every benchmark under ``experiments/`` (issue 19).

* **Warm-up excluded, compile reported apart.** :func:`measure` / :func:`interleaved` call every function once
  before timing and keep that first call's wall time (``first_s``: compile + first run for a jitted program);
  :func:`compile_seconds` times ``lower`` and ``compile`` of a jitted program ahead of time.
* **Paired sides.** :func:`interleaved` times several functions (two sides of a comparison, or one side at
  several generation lengths) in rounds whose order alternates ``A B, B A, A B, ...`` (ABBA), so that a slow
  drift of a shared machine hits every side alike; :meth:`Interleaved.ratio` is the distribution of the
  per-round ratios ``a_i / b_i`` (robust to load that changes between rounds, unlike a ratio of medians taken
  minutes apart).
* **Medians with spread.** Every figure is a :class:`Stats`: median, min, max, quartiles, n.
* **Decode rate from a fit.** ms/token is the slope of a least-squares line of time against the number of
  generated tokens over several lengths (:func:`fit_decode`); its intercept (prefill / loop entry) and residual
  are reported. A fit with a slope <= 0, fewer than two lengths or medians that do not grow with the length is
  refused (``per_token_s`` None, ``problem`` says why): never a difference of two runs that can go negative.
* **The machine written down.** :func:`environment` (CPU model and ISA flags from ``/proc/cpuinfo``, cores,
  thread settings, library versions) and :class:`LoadMonitor` (``/proc/loadavg`` and CPU pressure before, during
  and after a run) go into every results file (:func:`header_lines`). :func:`wait_for_quiet` waits for a quiet
  machine before a measured run.

Clocks are parameters (``clock``, ``cpu_clock``) so that the statistics are tested with fake clocks
(``tests/test_timing.py``); nothing here asserts on wall time.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Hashable, Iterable, Mapping, Sequence

Clock = Callable[[], float]


# ---------------------------------------------------------------------------------------------------
# Statistics
@dataclasses.dataclass(frozen=True)
class Stats:
    """Summary of repeated measurements (seconds, or a ratio)."""

    n: int
    median: float
    min: float
    max: float
    q1: float
    q3: float

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fmt(self, scale: float = 1e3, digits: int = 1) -> str:
        """``median [min-max]`` scaled (default: seconds -> ms)."""
        f = f"{{:.{digits}f}}"
        return f"{f.format(self.median * scale)} [{f.format(self.min * scale)}-{f.format(self.max * scale)}]"


def quantile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile of ``xs`` (numpy's default method), ``0 <= q <= 1``."""
    s = sorted(xs)
    if not s:
        raise ValueError("quantile of no samples")
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(samples: Iterable[float]) -> Stats:
    xs = [float(x) for x in samples]
    if not xs:
        raise ValueError("no samples to summarize")
    return Stats(n=len(xs), median=statistics.median(xs), min=min(xs), max=max(xs), q1=quantile(xs, 0.25),
                 q3=quantile(xs, 0.75))


def abba_orders(keys: Sequence[Hashable], rounds: int) -> list[list[Hashable]]:
    """Call order of each round: ``keys`` forward in even rounds, reversed in odd ones (A B, B A, A B, ...)."""
    keys = list(keys)
    return [keys if r % 2 == 0 else keys[::-1] for r in range(rounds)]


# ---------------------------------------------------------------------------------------------------
# Measuring
@dataclasses.dataclass
class Timing:
    """Wall (and process CPU) seconds of the timed calls of one function; ``first_s``: its first (warm-up) call,
    i.e. compile + first run for a jitted program (None when no warm-up was timed)."""

    samples: list[float]
    cpu_samples: list[float] = dataclasses.field(default_factory=list)
    first_s: float | None = None

    @property
    def stats(self) -> Stats:
        return summarize(self.samples)

    @property
    def median(self) -> float:
        return self.stats.median

    def to_dict(self) -> dict:
        d = {"stats": self.stats.to_dict(), "samples_s": self.samples, "first_s": self.first_s}
        if self.cpu_samples:
            d["cpu_stats"] = summarize(self.cpu_samples).to_dict()
        return d


@dataclasses.dataclass
class Interleaved:
    """Timings of several functions measured in interleaved (ABBA) rounds: ``timings[key].samples[i]`` is
    round ``i``."""

    timings: dict

    def __getitem__(self, key) -> Timing:
        return self.timings[key]

    def ratio(self, a, b) -> Stats:
        """Per-round ratios ``t_a / t_b``."""
        return summarize(x / y for x, y in zip(self.timings[a].samples, self.timings[b].samples))

    def to_dict(self) -> dict:
        return {str(k): t.to_dict() for k, t in self.timings.items()}


def interleaved(fns: Mapping[Hashable, Callable[[], object]], repeats: int, warmup: int = 1,
                clock: Clock = time.perf_counter, cpu_clock: Clock | None = time.process_time) -> Interleaved:
    """Time every function of ``fns`` ``repeats`` times, in rounds of ABBA order (:func:`abba_orders`).

    Each function must block until its result is ready. Warm-up: every function is called ``warmup`` times
    first (in order); the first call's wall time is kept as ``first_s``."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats}: need at least one timed call")
    out = {k: Timing([], []) for k in fns}
    for w in range(warmup):
        for k, f in fns.items():
            t0 = clock()
            f()
            if w == 0:
                out[k].first_s = clock() - t0
    for order in abba_orders(list(fns), repeats):
        for k in order:
            c0 = cpu_clock() if cpu_clock else 0.0
            t0 = clock()
            fns[k]()
            t1 = clock()
            out[k].samples.append(t1 - t0)
            if cpu_clock:
                out[k].cpu_samples.append(cpu_clock() - c0)
    return Interleaved(out)


def measure(fn: Callable[[], object], repeats: int, warmup: int = 1, clock: Clock = time.perf_counter,
            cpu_clock: Clock | None = time.process_time) -> Timing:
    """One function alone (:func:`interleaved` with one key)."""
    return interleaved({0: fn}, repeats, warmup, clock, cpu_clock)[0]


def compile_seconds(jitted, *args, clock: Clock = time.perf_counter, **kwargs) -> dict:
    """``{"lower_s", "compile_s", "compiled"}`` of ``jitted.lower(*args, **kwargs).compile()``: the compile time
    of a program, measured apart from any timed run (the compiled executable is returned for
    ``cost_analysis()`` / ``memory_analysis()``)."""
    t0 = clock()
    lowered = jitted.lower(*args, **kwargs)
    t1 = clock()
    compiled = lowered.compile()
    t2 = clock()
    return {"lower_s": t1 - t0, "compile_s": t2 - t1, "compiled": compiled}


def xla_analysis(compiled) -> dict:
    """Flops / bytes accessed (``cost_analysis``; loop bodies are counted once by XLA, not per trip) and the
    memory plan (``memory_analysis``) of a compiled program; missing entries are None."""
    out: dict = {}
    try:
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        out["xla_flops"] = float(ca.get("flops", float("nan"))) if ca else None
        out["xla_bytes_accessed"] = float(ca.get("bytes accessed", float("nan"))) if ca else None
    except Exception:  # noqa: BLE001 - an aid, may be missing on a backend
        out["xla_flops"] = out["xla_bytes_accessed"] = None
    try:
        ma = compiled.memory_analysis()
        out["temp_bytes"] = int(ma.temp_size_in_bytes)
        out["argument_bytes"] = int(ma.argument_size_in_bytes)
        out["output_bytes"] = int(ma.output_size_in_bytes)
        out["alias_bytes"] = int(ma.alias_size_in_bytes)
        out["plan_peak_bytes"] = int(ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
                                     - ma.alias_size_in_bytes)
    except Exception:  # noqa: BLE001
        out["plan_peak_bytes"] = None
    return out


# ---------------------------------------------------------------------------------------------------
# Decode rate: least-squares slope over generation lengths
@dataclasses.dataclass
class Fit:
    """``time = intercept + slope * n`` fitted to timings at several lengths ``n`` (tokens generated)."""

    lengths: list[int]
    medians: list[float]          # median time per length, seconds
    slope: float | None           # seconds per token (None: degenerate)
    intercept: float | None       # seconds (prefill / loop entry / copies)
    residual_rms: float | None    # of the per-sample residuals, seconds
    r2: float | None
    n: int                        # samples fitted
    problem: str | None = None    # why the fit is refused (then per_token_s is None)

    @property
    def ok(self) -> bool:
        return self.problem is None

    @property
    def per_token_s(self) -> float | None:
        return self.slope if self.ok else None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["per_token_s"] = self.per_token_s
        return d


def least_squares(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, float, float]:
    """``(slope, intercept, residual rms, r2)`` of the line through ``(xs, ys)``; needs two distinct xs."""
    n = len(xs)
    if n != len(ys) or n < 2:
        raise ValueError("least squares needs at least two points")
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("least squares needs two distinct x values")
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    intercept = my - slope * mx
    res = [y - (intercept + slope * x) for x, y in zip(xs, ys)]
    ss_res = sum(r * r for r in res)
    ss_tot = sum((y - my) ** 2 for y in ys)
    return slope, intercept, math.sqrt(ss_res / n), (1.0 - ss_res / ss_tot) if ss_tot > 0 else 1.0


def fit_decode(samples: Mapping[int, Sequence[float]]) -> Fit:
    """Fit ``time = intercept + slope * n`` to every sample of ``{n: [seconds, ...]}``.

    Refused (``problem`` set, ``per_token_s`` None) when fewer than two distinct lengths were timed, when the
    slope is not positive, or when the per-length medians do not strictly grow with the length (a figure that
    noise, not decoding, dominates)."""
    lengths = sorted(samples)
    medians = [statistics.median(samples[n]) for n in lengths] if all(samples[n] for n in lengths) else []
    xs = [float(n) for n in lengths for _ in samples[n]]
    ys = [float(t) for n in lengths for t in samples[n]]
    if len(lengths) < 2 or len(medians) != len(lengths):
        return Fit(list(lengths), medians, None, None, None, None, len(ys),
                   "degenerate: need timings at two or more generation lengths")
    slope, intercept, rms, r2 = least_squares(xs, ys)
    problem = None
    if not slope > 0:
        problem = f"non-positive slope {slope * 1e3:.3f} ms/token: timing noise exceeds the decode time"
    elif any(b <= a for a, b in zip(medians, medians[1:])):
        problem = ("non-monotone: the median time does not grow with the number of tokens "
                   f"({', '.join(f'{n}: {m * 1e3:.2f} ms' for n, m in zip(lengths, medians))})")
    return Fit(list(lengths), medians, slope, intercept, rms, r2, len(ys), problem)


def decode_lengths(new_tokens: int, points: int = 3) -> list[int]:
    """Generation lengths for a decode fit up to ``new_tokens + 1`` tokens: ``points`` lengths spread evenly
    from about a quarter of it (>= 2, so every length runs the decode loop) to ``new_tokens + 1``."""
    top = new_tokens + 1
    lo = max(2, top // 4)
    if top <= lo:
        return [top] if points == 1 else sorted({max(1, top - 1), top})
    return sorted({round(lo + (top - lo) * i / (points - 1)) for i in range(points)})


def fit_from(inter: Interleaved, side=None) -> Fit:
    """The decode fit of an :class:`Interleaved` whose keys are lengths ``n`` (or ``(side, n)`` pairs)."""
    samples = {}
    for key, t in inter.timings.items():
        if side is None:
            samples[int(key)] = t.samples
        elif isinstance(key, tuple) and key[0] == side:
            samples[int(key[1])] = t.samples
    return fit_decode(samples)


# ---------------------------------------------------------------------------------------------------
# The machine and its load
ISA_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx_vnni",
             "amx_tile", "amx_bf16")


def cpu_info(cpuinfo: str | None = None) -> dict:
    """CPU model, vendor, cores and which ISA extensions (:data:`ISA_FLAGS`) ``/proc/cpuinfo`` lists."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    model, vendor, flags = None, "", set()
    for line in cpuinfo.splitlines():
        key, _, val = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = val.strip()
        elif key == "vendor_id" and not vendor:
            vendor = val.strip()
        elif key == "flags" and not flags:
            flags = set(val.split())
    isa = {f: f in flags for f in ISA_FLAGS}
    simd = ("AVX-512" if isa["avx512f"] else "AVX2" if isa["avx2"] else "AVX" if isa["avx"] else "SSE/other")
    return {"model": model or platform.processor() or platform.machine(), "vendor": vendor, "cores": os.cpu_count(),
            "isa": isa, "widest_simd": simd}


def load_snapshot() -> dict:
    """``/proc/loadavg`` (1/5/15 min) and the CPU pressure (``/proc/pressure/cpu`` some avg10, % of time a task
    waited for a CPU) now; None where the file is missing."""
    snap: dict = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "loadavg": None, "cpu_pressure_avg10": None}
    try:
        snap["loadavg"] = [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        pass
    try:
        for line in Path("/proc/pressure/cpu").read_text().splitlines():
            if line.startswith("some"):
                snap["cpu_pressure_avg10"] = float(line.split("avg10=")[1].split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return snap


class LoadMonitor:
    """Load before / after a run and the maximum 1-minute load seen while it ran (sampled every ``period`` s in
    a daemon thread). ``with LoadMonitor() as lm: ...``; ``lm.to_dict()``."""

    def __init__(self, period: float = 15.0):
        self.period, self.before, self.after, self.max_load1 = period, None, None, None
        self._stop = threading.Event()
        self._thread = None

    def _poll(self):
        while not self._stop.wait(self.period):
            la = load_snapshot()["loadavg"]
            if la:
                self.max_load1 = max(self.max_load1 or 0.0, la[0])

    def __enter__(self):
        self.before = load_snapshot()
        self.max_load1 = (self.before["loadavg"] or [None])[0]
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict:
        if self.after is None:
            self._stop.set()
            self.after = load_snapshot()
            la = self.after["loadavg"]
            if la and self.max_load1 is not None:
                self.max_load1 = max(self.max_load1, la[0])
        return self.to_dict()

    def __exit__(self, *exc):
        self.stop()

    def to_dict(self) -> dict:
        return {"before": self.before, "after": self.after, "max_load1": self.max_load1}


def wait_for_quiet(max_load1: float = 0.6, timeout_s: float = 1200.0, poll_s: float = 60.0,
                   snapshot: Callable[[], dict] = load_snapshot, sleep: Callable[[float], None] = time.sleep,
                   log: Callable[[str], None] | None = None) -> dict:
    """Wait until the 1-minute load is below ``max_load1`` (checking every ``poll_s``), at most ``timeout_s``.
    Returns ``{"quiet": bool, "waited_s", "load": last snapshot}``: the run goes on either way and records it."""
    waited = 0.0
    while True:
        s = snapshot()
        la = (s.get("loadavg") or [0.0])[0]
        if la < max_load1 or waited >= timeout_s:
            return {"quiet": la < max_load1, "waited_s": waited, "threshold": max_load1, "load": s}
        if log:
            log(f"machine busy (1-min load {la:.2f} >= {max_load1}); waiting {poll_s:.0f} s")
        sleep(poll_s)
        waited += poll_s


def thread_settings() -> dict:
    """Thread / flag settings that change CPU timings: env vars, torch's intra/inter-op threads (if torch is
    imported), jax's device count and XLA flags (if jax is imported)."""
    env = {k: os.environ.get(k) for k in ("XLA_FLAGS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                          "TF_NUM_INTEROP_THREADS", "TF_NUM_INTRAOP_THREADS", "JAX_PLATFORMS")
           if os.environ.get(k) is not None}
    out: dict = {"env": env}
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        try:
            out["torch_threads"] = torch.get_num_threads()
            out["torch_interop_threads"] = torch.get_num_interop_threads()
            out["torch_mkldnn"] = bool(torch.backends.mkldnn.is_available())
            out["torch_mkl"] = bool(torch.backends.mkl.is_available())
        except Exception:  # noqa: BLE001
            pass
    if "jax" in sys.modules:
        jax = sys.modules["jax"]
        try:
            out["jax_devices"] = jax.device_count()
            out["jax_backend"] = jax.default_backend()
        except Exception:  # noqa: BLE001
            pass
    return out


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "torch", "transformers", "numpy"):
        mod = sys.modules.get(name)
        if mod is not None:
            out[name] = getattr(mod, "__version__", "?")
    return out


def environment() -> dict:
    """Everything about the machine a results file must carry (call after importing jax / torch)."""
    return {"cpu": cpu_info(), "os": f"{platform.system()} {platform.release()}", "threads": thread_settings(),
            "versions": versions()}


def describe_machine(env: dict) -> str:
    """``Intel(R) Xeon(R) Processor, 2 cores, AVX-512 (avx2 yes, avx512f yes, ...)``."""
    c = env["cpu"]
    isa = ", ".join(f"{k} {'yes' if c['isa'][k] else 'no'}" for k in ("avx2", "avx512f", "avx512_bf16", "amx_tile"))
    return f"{c['model']}, {c['cores']} cores, widest SIMD {c['widest_simd']} ({isa}); {env['os']}"


def describe_load(load: dict | None, quiet: dict | None = None) -> str:
    """One line: load before / max / after (and CPU pressure), and whether the quiet check passed."""
    if not load or not load.get("before"):
        return "load: not recorded"

    def la(s):
        return "n/a" if not s or not s.get("loadavg") else "/".join(f"{x:.2f}" for x in s["loadavg"])

    def psi(s):
        return "n/a" if not s or s.get("cpu_pressure_avg10") is None else f"{s['cpu_pressure_avg10']:.0f}%"

    mx = load.get("max_load1")
    line = (f"load (1/5/15-min loadavg) before {la(load['before'])}, after {la(load.get('after'))}, max 1-min during "
            f"{'n/a' if mx is None else f'{mx:.2f}'}; CPU pressure (some avg10) before {psi(load['before'])}, after "
            f"{psi(load.get('after'))}")
    if quiet is not None:
        line += (f"; quiet check (1-min < {quiet['threshold']}): {'passed' if quiet['quiet'] else 'NOT passed'} after "
                 f"{quiet['waited_s']:.0f} s")
    return line


def header_lines(env: dict, load: dict | None = None, quiet: dict | None = None) -> list[str]:
    """Markdown bullet lines: machine + ISA, threads, versions, load."""
    t = env["threads"]
    thr = [f"torch {t['torch_threads']} intra-op / {t.get('torch_interop_threads')} inter-op threads "
           f"(MKL {t.get('torch_mkl')}, oneDNN {t.get('torch_mkldnn')})"] if "torch_threads" in t else []
    thr += [f"jax {t.get('jax_backend')} x{t.get('jax_devices')}"] if "jax_devices" in t else []
    thr += [f"env {t['env']}" if t["env"] else "no thread / XLA_FLAGS env overrides"]
    v = env["versions"]
    return [f"- machine: {describe_machine(env)}",
            f"- threads: {'; '.join(thr)}",
            "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
            f"- {describe_load(load, quiet)}"]


# ---------------------------------------------------------------------------------------------------
# Command-line glue shared by the benchmarks
def add_cli(ap) -> None:
    """``--wait-quiet MIN`` / ``--max-load L``: wait up to MIN minutes for a 1-minute load below L before the
    measured part (the wait and the load are recorded either way)."""
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="MIN",
                    help="wait up to MIN minutes for a quiet machine (1-min load < --max-load) before measuring")
    ap.add_argument("--max-load", type=float, default=0.6, help="the quiet threshold of --wait-quiet (default 0.6)")


def shorten_notes(argv: Sequence[str]) -> list[str]:
    """``argv`` with each ``--note`` paragraph replaced by ``"..."`` (the notes are printed in full elsewhere)."""
    out, skip = [], False
    for x in argv:
        out.append('"..."' if skip else x)
        skip = x == "--note"
    return out


def quiet_from_cli(a, log=print) -> dict | None:
    if not getattr(a, "wait_quiet", 0):
        return None
    return wait_for_quiet(a.max_load, 60.0 * a.wait_quiet, log=lambda m: log(m, flush=True))


def fmt_ms(x: float | None, digits: int = 1, na: str = "n/a") -> str:
    return na if x is None else f"{x * 1e3:.{digits}f}"


def fmt_fit(fit: Fit, digits: int = 2) -> str:
    """``9.12 (+310.2, rms 1.30)``: ms/token, the fit's intercept in ms with its sign (a fitted parameter: noise can
    put it a little below zero; never quoted as a time), residual rms in ms; or ``refused (...)``."""
    if not fit.ok:
        return f"refused ({fit.problem.split(':')[0]})"
    return (f"{fit.slope * 1e3:.{digits}f} ({fit.intercept * 1e3:+.1f}, rms {fit.residual_rms * 1e3:.2f})")
