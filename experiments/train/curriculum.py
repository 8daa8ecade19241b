"""Curricula over ADSC drop ratios for LoRA fine-tuning, and the ADSC schedule a budget stands for.

A curriculum is a list of phases ``(fraction of the steps, ADSC budget)`` run in order; each phase's budget
is one static reducer spec, so each phase compiles once. Spec strings: ``"0.3:4,0.3:6,0.4:8"`` (absolute
budgets) or ``"0.3:x0.5,0.3:x0.75,0.4:x1"`` (multiples of the target budget, rounded), or a preset name.

What "reverse curriculum" means here (our choice; the paper, arXiv 2602.12618, is readable only as a
one-line third-party summary: "supervised instruction tuning with LoRA adapters and a reverse curriculum over
pruning ratios, enabling robust compression with minimal forgetting"). A curriculum in Bengio et al.'s sense
goes easy -> hard; for pruning that is mild -> aggressive (the usual progressive-pruning schedule). We read
"reverse" literally as the opposite order: **hard -> easy, from drop ratios above the target down to the
target** -- preset ``reverse`` = ``0.3:x0.5, 0.3:x0.75, 0.4:x1`` (a third of the steps at half the target
budget, then three quarters, and the last 40% at the target itself). Why:

* the bottleneck is what makes the model "reorganize and compress information into the remaining tokens"
  (the abstract): the hardest bottleneck comes first, while the learning rate is at its peak (warmup +
  cosine), where the adapters have the most freedom to learn that reorganisation;
* the phases then relax to the operating point, so training ends on the budget the adapters are evaluated
  at (no phase is milder than the target: steps there would train a regime we never use). The last,
  low-learning-rate updates are thus made on the mildest cut of the run, the one closest to the model's
  original (unpruned) behaviour -- our reading of "minimal forgetting";
* every phase is at least as hard as the target, so the harder phases act as a margin (robustness when a
  few more tokens are lost) rather than as a regime to unlearn.

This is a hypothesis, not the paper's recipe: ``forward`` below is the natural ablation.

Preset ``forward`` (``0.3:x2, 0.3:x1.5, 0.4:x1``, easy -> hard) and ``constant`` (``1:x1``) are the
ablations; any explicit list can be passed.

Budgets -> ADSC schedules (:func:`adsc_reducer`), raster mode:

* ``kind="average"``: the registry's convention (``reducers.registry`` "adsc"): ``budget`` = the per-layer
  average visual-token count, cuts at the template layers (``adsc_schedule``).
* ``kind="final"``: ``budget`` = the visual tokens left after the *last* cut; the cuts keep the fixed ratio
  ``rho = (budget / N) ** (1 / m)`` (``keeps[i] = round(N rho^(i+1))``, the last exactly ``budget``) -- what a
  shallow decoder can still express: averages below ``K_1 N / L`` (``K_1`` = first cut layer) are unreachable,
  e.g. 36.75 of 144 on a 4-layer decoder.
* ``kind="auto"``: ``average`` when every budget of the run is reachable that way, else ``final`` for all of
  them (one convention per run; the log records the resolved schedules and their true averages).
"""

from __future__ import annotations

import dataclasses

from jaxprune.reducers.adsc import adsc, adsc_schedule, default_layers, drop_noops, schedule_average
from jaxprune.reducers.base import BudgetError

PRESETS: dict[str, str] = {
    "reverse": "0.3:x0.5,0.3:x0.75,0.4:x1",
    "forward": "0.3:x2,0.3:x1.5,0.4:x1",
    "constant": "1:x1",
}
KINDS = ("average", "final", "auto")


@dataclasses.dataclass(frozen=True)
class Phase:
    fraction: float
    budget: int


def parse_curriculum(spec: str, target: int | None = None) -> list[Phase]:
    """Phases of a spec string or preset (see the module docstring); fractions must sum to 1."""
    text = PRESETS.get(spec.strip(), spec)
    phases = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        try:
            f, b = item.split(":")
            frac = float(f)
            if b.strip().startswith("x"):
                if target is None:
                    raise ValueError("a relative budget needs a target budget")
                budget = int(round(float(b.strip()[1:]) * target))
            else:
                budget = int(b)
                if float(b) != budget:
                    raise ValueError("budgets are whole tokens")
        except ValueError as e:
            raise ValueError(f"curriculum item {item!r}: expected 'FRACTION:BUDGET' or 'FRACTION:xMULT' "
                             f"({e})") from None
        if not frac > 0:
            raise ValueError(f"curriculum item {item!r}: the fraction must be > 0")
        if budget < 1:
            raise ValueError(f"curriculum item {item!r}: budget {budget} < 1 token")
        phases.append(Phase(frac, budget))
    if not phases:
        raise ValueError(f"empty curriculum {spec!r}; presets: {sorted(PRESETS)}")
    total = sum(p.fraction for p in phases)
    if abs(total - 1) > 1e-6:
        raise ValueError(f"curriculum {spec!r}: fractions sum to {total:g}, not 1")
    return phases


def phase_bounds(phases: list[Phase], steps: int) -> list[tuple[int, int, int]]:
    """``[(start, stop, budget)]`` covering ``range(steps)``: boundaries ``round(cumulative fraction * steps)``;
    every phase gets at least one step."""
    if steps < len(phases):
        raise ValueError(f"{steps} steps cannot hold {len(phases)} curriculum phases")
    out, start, acc = [], 0, 0.0
    for i, p in enumerate(phases):
        acc += p.fraction
        left = len(phases) - i - 1
        stop = steps if not left else min(max(start + 1, round(acc * steps)), steps - left)
        out.append((start, stop, p.budget))
        start = stop
    return out


def budget_at(bounds: list[tuple[int, int, int]], step: int) -> int:
    for start, stop, b in bounds:
        if start <= step < stop:
            return b
    raise IndexError(f"step {step} is outside the curriculum ({bounds[-1][1]} steps)")


# ---------------------------------------------------------------------------------------------------
def final_plan(budget: int, num_layers: int, total: int, layers=None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``kind="final"`` schedule: ``(layers, keeps)`` with a fixed ratio per cut ending at ``budget`` tokens
    (:func:`jaxprune.reducers.registry.final_keeps`; with the default layers this is the registry's ``adsc_final``)."""
    from jaxprune.reducers.registry import final_keeps

    layers = default_layers(num_layers) if layers is None else tuple(layers)
    if not 1 <= budget < total:
        raise BudgetError(f"final budget {budget} must be in [1, {total})")
    return drop_noops(layers, final_keeps(budget, total, len(layers)), total)


def _lowest_average(num_layers: int, total: int, layers=None) -> float:
    layers = default_layers(num_layers) if layers is None else tuple(layers)
    return schedule_average(layers, [1] * len(layers), num_layers, total)


def resolve_kind(kind: str, budgets, num_layers: int, total: int, layers=None) -> str:
    if kind not in KINDS:
        raise ValueError(f"budget kind {kind!r} is not one of {KINDS}")
    if kind != "auto":
        return kind
    low = _lowest_average(num_layers, total, layers)
    return "average" if all(low <= b < total for b in budgets) else "final"


def adsc_reducer(budget: int, num_layers: int, total: int, kind: str = "average", layers=None):
    """The ADSC (raster) spec ``budget`` stands for under ``kind`` ("average" or "final")."""
    if kind == "average":
        return adsc_schedule(budget, num_layers=num_layers, total=total, layers=layers)
    if kind == "final":
        return adsc(*final_plan(budget, num_layers, total, layers))
    raise ValueError(f"kind must be 'average' or 'final' here, got {kind!r}")


def describe(reducer, num_layers: int, total: int) -> dict:
    """``{"layers", "keeps", "average"}`` of an ADSC spec (average visual tokens over the decoder layers)."""
    cuts = [r for r in getattr(reducer, "reducers", (reducer,))]
    layers, keeps = [c.layer for c in cuts], [c.keep for c in cuts]
    return {"layers": layers, "keeps": keeps, "average": schedule_average(layers, keeps, num_layers, total)}
