"""What each reducer keeps: its kept visual tokens drawn over the image the model saw (one PNG grid per reducer).

For each reducer name: rows = budgets (largest first), columns = sample images.  Each panel shows the
preprocessed image (after LLaVA's pad-to-square and resize, de-normalised), patches whose token did not reach the
LLM darkened, kept patches outlined.  The kept source patch indices come from the reducer plan's pre-LLM stage
(``LlavaOutput.kept`` semantics: ``[N_img, k]``, -1 = empty slot / CLS).  Reducers that only cut inside the LLM
(FastV, ADSC, PyramidDrop, DART) get no PNG: the LLM receives every visual token and the selection happens in
the decoder, on the layer's attention. A reducer with a pre-LLM stage and later cuts (VisionDrop) shows the tokens
entering the LLM and says so in its title.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxprune.eval.benchmarks import Question

from .batching import Batch, build_rows, make_items
from .config import ReducerSpec


_KEPT_JITS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> jitted pre-LLM stages


def _pre_llm_kept(graphdef, params, arrays, *, static):
    from flax import nnx

    from jaxprune.engine import encode

    out = encode(nnx.merge(graphdef, params), static, arrays)
    return out[5], out[6]


def kept_tokens(model: Any, reducer: Any, input_ids: np.ndarray, attention_mask: np.ndarray,
                pixel_values: np.ndarray, image_sizes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(kept [N, k] source indices, kept_valid [N, k]) after the vision/projector stages (the LLM is not run)."""
    import jax

    p = model.plan(input_ids, pixel_values, attention_mask, image_sizes, reducer)
    fn = _KEPT_JITS.get(model)
    if fn is None:
        fn = _KEPT_JITS[model] = jax.jit(functools.partial(_pre_llm_kept, model.graphdef), static_argnames=("static",))
    kept, valid = fn(model.params, p.arrays, static=p.static)
    kept = np.asarray(kept)
    return kept, (np.asarray(valid) if valid is not None else kept >= 0)


def _denormalise(px: np.ndarray, img_cfg: Any) -> np.ndarray:
    mean = np.asarray(img_cfg.mean, np.float32)[:, None, None]
    std = np.asarray(img_cfg.std, np.float32)[:, None, None]
    return np.clip((px * std + mean).transpose(1, 2, 0), 0.0, 1.0)


def _in_llm(reducer: Any) -> str | None:
    from jaxprune.engine import split_reducer

    cuts = [r for r in split_reducer(reducer)[0] if r.stage == "llm"]
    return ", ".join(f"layer {r.layer}" for r in cuts) if cuts else None


def _only_in_llm(spec: ReducerSpec, cfg: Any) -> bool:
    """True for a reducer that only cuts inside the LLM (FastV, ADSC, PyramidDrop, DART): the LLM receives every
    visual token, so its overlay would show the whole image; no PNG is drawn for it."""
    from jaxprune.engine import split_reducer

    from .runner import make_reducer

    try:
        stages = [r.stage for r in split_reducer(make_reducer(spec, cfg))[0]]
    except Exception:  # noqa: BLE001 - an unbuildable spec gets its panel with the error instead
        return False
    return bool(stages) and all(st == "llm" for st in stages)


def draw_overlays(ctx: Any, specs: Sequence[ReducerSpec], samples: Sequence[Question], out_dir: str | Path
                  ) -> list[Path]:
    """One PNG per reducer name in ``specs`` (``out_dir/<name>.png``); returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    from .runner import make_reducer

    model, cfg = ctx.model, ctx.model.cfg
    from .runner import max_image_tokens

    P, grid, S = max_image_tokens(ctx), cfg.vision.grid, cfg.vision.image_size
    items = [it for it in make_items(list(samples), ctx.tokenizer, P, ctx.img_cfg) if it.n_images]
    if not items:
        return []
    batch = Batch(tuple(items), len(items), max(it.length for it in items), 1)
    rows = build_rows(batch, range(len(items)), ctx.tokenizer, cfg.image_token_index, P, ctx.img_cfg, S)
    ok = [j for j in range(len(items)) if rows.ok[j]]
    if not ok:
        return []
    by_name: dict[str, list[ReducerSpec]] = {}
    for s in specs:
        if not s.is_full and not _only_in_llm(s, cfg):
            by_name.setdefault(s.name, []).append(s)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    cell = S / grid
    for name, group in by_name.items():
        group = sorted(group, key=lambda s: -s.budget)
        fig, axes = plt.subplots(len(group), len(ok), figsize=(2.6 * len(ok), 2.8 * len(group)), squeeze=False)
        for i, spec in enumerate(group):
            try:
                reducer = make_reducer(spec, cfg)
                kept, valid = kept_tokens(model, reducer, rows.input_ids[ok], rows.attention_mask[ok],
                                          rows.pixel_values[ok],
                                          None if rows.image_sizes is None else rows.image_sizes[ok])
                note = _in_llm(reducer)
            except Exception as e:  # noqa: BLE001 - one bad budget must not lose the other panels
                kept, valid, note = None, None, f"failed: {e}"
            for j, r in enumerate(ok):
                ax = axes[i][j]
                base = rows.pixel_values[r] if rows.pixel_values.ndim == 4 else rows.pixel_values[r][0]  # NeXT: base crop
                ax.imshow(_denormalise(base, ctx.img_cfg), extent=(0, S, S, 0))
                ax.set_xticks([])
                ax.set_yticks([])
                if kept is None:
                    ax.set_title(f"{spec.label}\n{note[:60]}", fontsize=7)
                    continue
                idx = sorted({int(k) for k, v in zip(kept[j], valid[j]) if v and 0 <= k < grid * grid})
                shade = np.full((grid, grid, 4), (0.0, 0.0, 0.0, 0.68), np.float32)
                for k in idx:
                    shade[k // grid, k % grid, 3] = 0.0
                # one artist for every outline of the panel
                ax.add_collection(PatchCollection(
                    [Rectangle(((k % grid) * cell, (k // grid) * cell), cell, cell) for k in idx],
                    facecolor="none", edgecolor=(1.0, 0.85, 0.1), linewidth=0.6))
                ax.imshow(shade, extent=(0, S, S, 0), interpolation="nearest")
                n_tok = int(np.asarray(valid[j]).sum())
                title = f"{spec.label}: {n_tok} tokens" + (f", {len(idx)} patches" if len(idx) != n_tok else "")
                if note:
                    title += f"\n(cut inside the LLM at {note}; LLM input shown)"
                if i == 0:
                    title = f"{items[r].question.key}\n" + title
                ax.set_title(title, fontsize=7)
        fig.suptitle(f"{name}: visual tokens kept (bright, outlined) per budget", fontsize=9)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
