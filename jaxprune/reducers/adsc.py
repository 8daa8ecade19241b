"""ADSC, training-free form: uniform downsampling of the visual tokens at chosen LLM layers.

Paper: "Vision Token Reduction via Attention-Driven Self-Compression for Efficient Multimodal Large
Language Models" (Deniz, Mao, Li, Tian, Khan; arXiv 2602.12618, IEEE BigData 2025). No public code
(searched by name and arXiv id); only the abstract and third-party summaries were readable.

What is specified [abstract]: inside the LLM, "uniform token downsampling at selected layers, forming
bottlenecks that encourage the model to reorganize and compress information into the remaining
tokens"; no scores, no auxiliary modules, no attention modification (FlashAttention-compatible).
[3rd-party summary]: "a fixed downsampling ratio at selected layers"; the model is fine-tuned with
LoRA and a reverse curriculum over pruning ratios.
What is NOT specified (so chosen here): the layers, the ratios, what "uniform" means, the positions,
the LoRA setup.

**This module is the training-free form only** (the bottleneck schedule applied to the frozen
model); LoRA fine-tuning with the curriculum: jaxprune.lora + experiments/train/adsc_lora.py. Reported by the paper
(LLaVA-1.5-7B, *with* the LoRA stage): FLOPs -53.7%, peak KV cache -56.7%, 98.2% of the original
performance at a "66.7% vision-token budget" (most likely 192 average tokens of 576: with ~100 text
tokens, (192+100)/(576+100) = 0.43 matches the -56.7% KV figure); GQA 61 [3rd-party listing].
Expected here, without training (not yet measured): the in-LLM "uniform drop" baseline -- below
score-based in-LLM pruning (FastV) at the same average count and degrading sharply at 128/64, the
regime where the paper says heuristics fail and its training makes the model robust.

One cut, :class:`ADSCCut` ``(layer, keep, mode, grid, positions)``, after decoder layer ``layer``:

* ``mode="raster"`` -- 1-D stride on the order of the current visual pool (raster order for an
  untouched image). With ``n`` valid visual tokens in the row, output ``i`` (``0 <= i < keep``) is
  the valid token of rank ``floor(i * n / keep)`` (``_core.uniform_indices`` rule ``"floor"``: starts
  at the first token; ``x[::r]`` when ``keep = n / r``). With every token valid this is exactly
  ``uniform_indices(V, keep)``; if ``n < keep`` every valid token is kept and the remaining slots
  come back ``valid=False``.
* ``mode="grid"`` -- 2-D stride on the patch grid of the current pool: per image, rows
  ``0, s_h, 2 s_h, ...`` and columns ``0, s_w, ...`` (``_core.strided_grid_indices``, ``x[::s_h, ::s_w]``),
  e.g. 24x24 -> 12x12 keeps every 2nd row and column. ``grid`` is the per-image grid of the pool
  *entering this cut* (``None``: the pool must be one square image, grid ``sqrt(V) x sqrt(V)``); the
  pool holds ``V / (rows * cols)`` images. The output grid ``(o_h, o_w)`` must divide the input grid
  (``o_h | rows``, ``o_w | cols``, ``o_h * o_w = keep / images``); among those the most square is
  taken (min ``|log(o_h / o_w)|``; ties: more rows), so 24x24 -> 288 is 24x12 and 24x12 -> 144 is 12x12.
  The output pool is that smaller grid: :func:`adsc` hands each later cut its input grid.
  Validity is gathered (the pattern is static).
* ``positions`` -- ``"keep"`` (default: kept tokens keep their RoPE ids, as FastV/DART) or
  ``"renumber"`` (PyramidDrop/VisionDrop). The paper does not say. We keep them because the model is
  frozen: the text tokens then keep the positions -- and relative distances -- they had in the layers
  before the cut, and a strided image keeps its RoPE geometry (position stride = raster stride).
  ``renumber`` is a field for the trained variant, where either can be learned.

Schedules. :func:`adsc` ``(layers, keeps, mode)`` composes cuts (``keeps[i]`` = visual tokens after
cut ``i``; layers strictly increasing, keeps never growing). :func:`adsc_schedule` ``(average,
num_layers=32, total=576, mode)`` builds one whose per-layer average visual-token count is
``average``: with the count ``c_l`` processed by decoder layer ``l`` (``total`` before the first
cut, ``keeps[i]`` from layer ``layers[i]`` on), ``avg = sum_l c_l / num_layers``. Rule:

* Layers: ``layers`` or the template ``(2, L/4, L/2)`` = (2, 8, 16) for L = 32 (``round(L/16)``,
  ``L // 4``, ``L // 2``, deduplicated, clipped to ``[1, L)``): the FastV/DART layer, then a quarter
  and half of the depth.
* Raster: one "fixed downsampling ratio" ``rho`` for every cut, solved by bisection on the exact
  (unrounded) average ``(K_1 N + sum_i (K_{i+1} - K_i) N rho^i) / L = average`` (with ``K_{m+1} = L``);
  ``keeps[i] = round(N rho^{i+1})`` for all but the last cut, and the last cut's count is solved
  for the average (``round((average L - earlier layers' sum) / (L - K_m))``, clipped to
  ``[1, keeps[m-2]]``), so ``|avg - average| <= (L - K_m) / (2 L)`` = 0.25 token for (2, 8, 16).
  Example, 192 on LLaVA-1.5: ``rho = 0.5596``, keeps (322, 180) then the last solved: 101; avg =
  (2 x 576 + 6 x 322 + 8 x 180 + 16 x 101) / 32 = 6140 / 32 = 191.875.
* Grid: counts must be grids dividing the previous one; the chain (one count per template layer,
  a cut that keeps everything is dropped) closest to the raster ratios (min ``sum_i |log(c_i / (N
  rho^{i+1}))|``) among those with ``|avg - average| <= max(1, 0.02 average)``; ties: smaller
  ``|avg - average|``, then larger counts. Raises :class:`BudgetError` (with the closest average
  reachable) when none is within tolerance.

Resulting schedules for LLaVA-1.5-7B (32 layers, 576 = 24x24 tokens; ``tests/test_reducer_adsc.py``):

=======  =========================================  =========================================================
average  raster: layers (2, 8, 16) -> keeps, avg     grid: layers -> keeps (per-image grids), avg
=======  =========================================  =========================================================
192      322, 180, 101 -> 191.875                   (8, 16) -> 96 (12x8), 48 (6x8) -> 192.0
128      242, 101, 43 -> 128.125                    (2, 8, 16) -> 288 (24x12), 96 (8x12), 32 (8x4) -> 130.0
64       110, 21, 4 -> 63.875                       (2, 8, 16) -> 96 (12x8), 32 (4x8), 4 (2x2) -> 64.0
=======  =========================================  =========================================================

JAX: the kept slots are a static pattern (grid) or a rank gather (raster); no scores, no callbacks.
Deviations: everything above that the paper does not specify is our choice (see "What is NOT
specified"); no LoRA stage.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import jax.numpy as jnp
import numpy as np

from jaxprune.reducers._core import strided_grid_indices
from jaxprune.reducers.base import BudgetError, check_budget
from jaxprune.reducers.llm import LLMContext, LLMReduced, LLMReducerBase, check_layer
from jaxprune.reducers.compose import Compose, compose
from jaxprune.reducers.registry import final_keeps, register, visual_tokens

_MODES = ("raster", "grid")
_POSITIONS = ("keep", "renumber")

__all__ = ["ADSCCut", "adsc", "adsc_plan", "adsc_schedule", "default_layers", "grid_step", "schedule_counts"]


# ---------------------------------------------------------------------------------------------------
def _check_grid(name: str, grid) -> tuple[int, int] | None:
    if grid is None:
        return None
    if not (isinstance(grid, tuple) and len(grid) == 2 and all(isinstance(g, int) and not isinstance(g, bool)
                                                                and g > 0 for g in grid)):
        raise BudgetError(f"{name}.grid must be a (rows, cols) tuple of positive ints, got {grid!r}")
    return grid


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def grid_step(grid: tuple[int, int], keep: int) -> tuple[int, int]:
    """Output grid ``(o_h, o_w)`` of a 2-D stride cut from ``grid`` to ``keep`` tokens per image: ``o_h``
    divides the rows, ``o_w`` the columns, ``o_h * o_w = keep``; the most square one (ties: more rows)."""
    gh, gw = grid
    cands = [(oh, keep // oh) for oh in _divisors(gh) if keep % oh == 0 and gw % (keep // oh) == 0]
    if not cands:
        reach = sorted({a * b for a in _divisors(gh) for b in _divisors(gw)})
        raise BudgetError(f"ADSC grid mode: {keep} tokens per image is not a {gh}x{gw} grid subsampled by "
                          f"integer strides (rows and columns must divide {gh} and {gw}); reachable: {reach}")
    return min(cands, key=lambda c: (abs(math.log(c[0] / c[1])), -c[0]))


def _pool_grid(name: str, grid, available: int) -> tuple[tuple[int, int], int]:
    """``(per-image grid, images)`` of a pool of ``available`` tokens."""
    if grid is None:
        g = math.isqrt(available)
        if g * g != available:
            raise BudgetError(f"{name}: mode='grid' with grid=None needs a square pool, got {available} tokens; "
                              "pass grid=(rows, cols) of the pool entering this cut")
        return (g, g), 1
    gh, gw = grid
    if available % (gh * gw):
        raise BudgetError(f"{name}: the pool of {available} tokens is not a whole number of {gh}x{gw} grids")
    return grid, available // (gh * gw)


@dataclasses.dataclass(frozen=True)
class ADSCCut(LLMReducerBase):
    """One ADSC bottleneck: keep ``keep`` evenly spaced visual tokens after decoder layer ``layer``."""

    layer: int
    keep: int
    mode: str = "raster"
    grid: tuple[int, int] | None = None   # grid mode: per-image grid of the pool entering this cut
    positions: str = "keep"               # "keep" | "renumber" (a field here, a ClassVar elsewhere)

    def __post_init__(self):
        check_layer("ADSCCut", self.layer)
        check_budget("ADSCCut.keep", self.keep)
        if self.mode not in _MODES:
            raise BudgetError(f"ADSCCut.mode={self.mode!r} is not one of {_MODES}")
        if self.positions not in _POSITIONS:
            raise BudgetError(f"ADSCCut.positions={self.positions!r} is not one of {_POSITIONS}")
        _check_grid("ADSCCut", self.grid)
        if self.mode == "raster" and self.grid is not None:
            raise BudgetError("ADSCCut: grid= is only used by mode='grid'")
        # grid divisibility is checked by output_visual (before tracing), once the pool size is known

    def plan_grid(self, available: int) -> tuple[tuple[int, int], tuple[int, int], int]:
        """Grid mode: ``(input grid, output grid, images)`` for a pool of ``available`` tokens."""
        g, n_img = _pool_grid("ADSCCut", self.grid, available)
        if self.keep % n_img:
            raise BudgetError(f"ADSCCut: keep={self.keep} is not a multiple of the {n_img} images in the pool")
        return g, grid_step(g, self.keep // n_img), n_img

    def output_visual(self, available: int) -> int:
        check_budget("ADSCCut.keep", self.keep, available)
        if self.mode == "grid":
            self.plan_grid(available)
        return self.keep

    def output_grid(self, available: int) -> tuple[int, int]:
        return self.plan_grid(available)[1]

    def __call__(self, ctx: LLMContext) -> LLMReduced:
        B, V = ctx.visual_index.shape
        k = self.output_visual(V)
        if self.mode == "grid":
            (gh, gw), (oh, ow), n_img = self.plan_grid(V)
            one = strided_grid_indices(gh, gw, gh // oh, gw // ow)  # [oh * ow] ascending
            idx = (np.arange(n_img)[:, None] * (gh * gw) + one[None]).reshape(-1).astype(np.int32)
            slots = jnp.broadcast_to(jnp.asarray(idx)[None], (B, k))
            valid = jnp.take_along_axis(ctx.visual_valid, slots, axis=1)
        else:
            vv = ctx.visual_valid
            order = jnp.argsort(~vv, axis=1, stable=True).astype(jnp.int32)  # valid first, pool order
            nv = jnp.sum(vv, axis=1, dtype=jnp.int32)[:, None]  # [B, 1]
            i = jnp.arange(k, dtype=jnp.int32)[None]
            rank = jnp.where(nv >= k, (i * nv) // k, i)  # distinct ranks; too few valid: all, then fillers
            picked = jnp.take_along_axis(order, rank, axis=1)  # [B, k] distinct pool slots
            ok = i < jnp.minimum(nv, k)
            slots = jnp.sort(picked, axis=1)  # ascending, so each token keeps its own slot's position
            valid = jnp.take_along_axis(jnp.zeros((B, V), bool).at[jnp.arange(B)[:, None], picked].set(ok),
                                        slots, axis=1)
        tokens = jnp.take_along_axis(ctx.visual_hidden, slots[..., None], axis=1)
        return LLMReduced(slots=slots, tokens=tokens, valid=valid)


# ---------------------------------------------------------------------------------------------------
def adsc(layers, keeps, mode: str = "raster", grid: tuple[int, int] | None = None,
         positions: str = "keep") -> Compose:
    """Cuts after ``layers[i]`` down to ``keeps[i]`` visual tokens: ``adsc((2, 8, 16), (288, 144, 72))``.

    Grid mode: ``grid`` is the per-image grid entering the first cut (None: square, inferred); each
    later cut gets the grid the previous one leaves (with ``grid=None`` every intermediate count must
    then be a square grid)."""
    layers, keeps = tuple(layers), tuple(keeps)
    if not layers or len(layers) != len(keeps):
        raise BudgetError(f"adsc: need one keep per layer, got layers={layers} keeps={keeps}")
    for a, b in itertools.pairwise(layers):
        if b <= a:
            raise BudgetError(f"adsc: layers must be strictly increasing, got {layers}")
    for a, b in itertools.pairwise(keeps):
        if b > a:
            raise BudgetError(f"adsc: the schedule grows the visual token count ({a} -> {b}) in keeps={keeps}")
    g = _check_grid("adsc", grid)
    cuts = []
    for i, (layer, keep) in enumerate(zip(layers, keeps)):
        if mode == "grid" and i > 0:
            if g is None:
                s = math.isqrt(keeps[i - 1])
                if s * s != keeps[i - 1]:
                    raise BudgetError(f"adsc: mode='grid' with grid=None: the count {keeps[i - 1]} after layer "
                                      f"{layers[i - 1]} is not a square grid; pass grid=(rows, cols) of the first "
                                      "cut's input (24x24 for LLaVA-1.5)")
                cin = (s, s)
            else:
                cin = g
        else:
            cin = g
        cut = ADSCCut(layer=layer, keep=keep, mode=mode, grid=cin, positions=positions)
        if mode == "grid" and cin is not None:
            g = cut.output_grid(cin[0] * cin[1])  # one image per row (LLaVA-1.5)
        cuts.append(cut)
    return compose(*cuts)


def default_layers(num_layers: int) -> tuple[int, ...]:
    """Template cut layers ``(round(L/16), L//4, L//2)`` -> (2, 8, 16) for 32 layers."""
    L = num_layers
    raw = (max(1, round(2 * L / 32)), L // 4, L // 2)
    return tuple(sorted({k for k in raw if 1 <= k < L}))


def schedule_counts(layers, keeps, num_layers: int, total: int) -> list[int]:
    """Visual tokens processed by each decoder layer ``0..L-1`` (a cut after layer K changes layer K on)."""
    out, c, j = [], total, 0
    for l in range(num_layers):
        while j < len(layers) and layers[j] <= l:
            c, j = keeps[j], j + 1
        out.append(c)
    return out


def schedule_average(layers, keeps, L, N) -> float:
    """Visual tokens per decoder layer averaged over the ``L`` layers of the schedule ``(layers, keeps)`` on
    ``N`` visual tokens (:func:`schedule_counts`)."""
    return sum(schedule_counts(layers, keeps, L, N)) / L


def _solve_rho(average: float, layers, L: int, N: int) -> float:
    bounds = list(layers) + [L]

    def avg(rho):
        return (layers[0] * N + sum((bounds[i + 1] - bounds[i]) * N * rho ** (i + 1)
                                    for i in range(len(layers)))) / L

    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if avg(mid) < average else (lo, mid)
    return (lo + hi) / 2


def adsc_plan(average: float, num_layers: int = 32, total: int = 576, mode: str = "raster", layers=None,
              grid: tuple[int, int] | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(layers, keeps)`` of the schedule whose per-layer average visual count is ``average`` (module doc)."""
    L, N = num_layers, total
    if mode not in _MODES:
        raise BudgetError(f"adsc_plan: mode={mode!r} is not one of {_MODES}")
    layers = default_layers(L) if layers is None else tuple(layers)
    for k in layers:
        check_layer("adsc_plan", k, L)
    if list(layers) != sorted(set(layers)):
        raise BudgetError(f"adsc_plan: layers must be strictly increasing, got {layers}")
    lowest = schedule_average(layers, [1] * len(layers), L, N)
    if not lowest <= average < N:
        hint = ""
        if average < lowest:
            hint = (f": the first {layers[0]} layer(s) always see all {N} tokens ({N * layers[0] / L:g} on average) "
                    "and every cut keeps at least one; " + ("cut earlier" if layers[0] > 1 else
                                                           "a deeper decoder is needed (LLaVA-1.5 has 32 layers)"))
        raise BudgetError(f"adsc_plan: average={average} must be in [{lowest:.3f}, {N}) for cuts after layers "
                          f"{layers} of {L} with {N} visual tokens{hint}")
    rho = _solve_rho(average, layers, L, N)
    targets = [N * rho ** (i + 1) for i in range(len(layers))]
    if mode == "raster":
        keeps, prev = [], N
        for t in targets[:-1]:
            prev = min(prev, max(1, round(t)))
            keeps.append(prev)
        partial = schedule_average(layers, keeps + [0], L, N) * L  # the last segment counted as 0
        last = round((average * L - partial) / (L - layers[-1]))
        keeps.append(min(prev, max(1, last)))
        return drop_noops(layers, tuple(keeps), N)
    g = _check_grid("adsc_plan", grid) or _square(N)
    if N != g[0] * g[1]:
        raise BudgetError(f"adsc_plan: grid {g} does not hold total={N} tokens (one image)")
    tol = max(1.0, 0.02 * average)
    best, closest = None, None
    for keeps in _grid_chains(g, len(layers)):
        a = schedule_average(layers, keeps, L, N)
        err = abs(a - average)
        if closest is None or err < closest:
            closest = err
        if err > tol:
            continue
        dev = sum(abs(math.log(c / t)) for c, t in zip(keeps, targets))
        key = (round(dev, 9), err, tuple(-c for c in keeps))
        if best is None or key < best[0]:
            best = (key, keeps)
    if best is None:
        raise BudgetError(f"adsc_plan: no grid schedule on {g[0]}x{g[1]} with cuts after layers {layers} averages "
                          f"{average} within {tol:.2f} (closest is {closest:.2f} away); use mode='raster' or "
                          "other layers")
    return drop_noops(layers, best[1], N)


def _square(n: int) -> tuple[int, int]:
    g = math.isqrt(n)
    if g * g != n:
        raise BudgetError(f"adsc_plan: total={n} is not a square grid; pass grid=(rows, cols)")
    return (g, g)


def _grid_chains(grid, m: int):
    """Every sequence of ``m`` non-increasing per-image counts reachable by successive 2-D stride cuts."""
    def rec(g, left):
        if not left:
            yield ()
            return
        cur = g[0] * g[1]
        for c in sorted({a * b for a in _divisors(g[0]) for b in _divisors(g[1])}, reverse=True):
            if c > cur:
                continue
            nxt = g if c == cur else grid_step(g, c)
            for rest in rec(nxt, left - 1):
                yield (c,) + rest
    yield from rec(grid, m)


def drop_noops(layers, keeps, N):
    """``(layers, keeps)`` without the cuts that keep every token (no-ops) of the ``N`` before them; a
    :class:`~jaxprune.reducers.base.BudgetError` when no cut is left."""
    out_l, out_k, prev = [], [], N
    for k, c in zip(layers, keeps):
        if c < prev:
            out_l.append(k)
            out_k.append(c)
            prev = c
    if not out_l:
        raise BudgetError("adsc_plan: the schedule has no cut that drops tokens")
    return tuple(out_l), tuple(out_k)


def adsc_schedule(average: float, num_layers: int = 32, total: int = 576, mode: str = "raster", layers=None,
                  grid: tuple[int, int] | None = None, positions: str = "keep") -> Compose:
    """``adsc(*adsc_plan(average, ...))``: e.g. ``adsc_schedule(192)`` for LLaVA-1.5-7B."""
    ls, ks = adsc_plan(average, num_layers, total, mode, layers, grid)
    g = (grid or _square(total)) if mode == "grid" else None
    return adsc(ls, ks, mode=mode, grid=g, positions=positions)


register("adsc", lambda b, c: adsc_schedule(b, num_layers=c.text.num_hidden_layers, total=visual_tokens(c)))
@register("adsc_grid")
def _adsc_grid(budget: int, cfg) -> Compose:
    """ADSC's 2-D stride on the patch grid: needs one square grid per image (LLaVA-1.5). A LLaVA-NeXT image is a
    packed base crop + unpadded tile grid + newlines, a Video-LLaVA video a sequence of frames (each with its
    CLS) in the LLM: neither has a single grid, so both are refused (use ``adsc``)."""
    mt = getattr(cfg, "model_type", "llava")
    if mt != "llava":
        what = ("videos are frame sequences (each frame's CLS + patches)" if mt == "video_llava"
                else "images are packed anyres sequences")
        raise BudgetError(f"adsc_grid strides a square per-image patch grid; {mt} {what} with no single grid: "
                          "use 'adsc' (raster stride) on this family")
    return adsc_schedule(budget, num_layers=cfg.text.num_hidden_layers, total=visual_tokens(cfg), mode="grid")


@register("adsc_final")
def _adsc_final(budget: int, cfg) -> Compose:
    """``budget`` = visual tokens left after the last cut (``registry.final_keeps``), default layers."""
    layers = default_layers(cfg.text.num_hidden_layers)
    return adsc(*drop_noops(layers, final_keeps(budget, visual_tokens(cfg), len(layers)), visual_tokens(cfg)))
