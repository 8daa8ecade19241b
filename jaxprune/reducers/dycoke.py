"""DyCoke's token temporal merging (TTM): drop the tokens of a frame that repeat the same token of an earlier frame.

Paper: "DyCoke: Dynamic Compression of Tokens for Fast Video Large Language Models" (Tao et al., CVPR 2025,
arXiv 2411.15024). Code: KD-TAO/DyCoke @ dd7463498203479d0ff6f2d29c4e72928c0af244, ``llava/model/llava_arch.py``
(``dycole_ttm``, called on the projected (and pooled) video features of LLaVA-OneVision with
``dycoke_num_tokens_per_frame`` and ``dycoke_k`` = ``merging_ratio``, default 0.7).

The official rule, on a video of ``F`` frames of ``P`` tokens each (features after the projector):

1. pairs ``(i, i+1)`` for ``i = 0, 2, 4, ...`` (``range(0, F - 1, 2)``): frame ``i + 1`` keeps the
   ``int((1 - merging_ratio) * P)`` tokens whose cosine similarity with the *same position* of frame ``i`` is
   lowest (``topk(largest=False)``); frame ``i`` is kept whole;
2. groups of four (``range(0, F - 4, 4)``): frame ``i + 2`` is instead compared with frame ``i`` (original
   features) and keeps its lowest-similarity ``int((1 - merging_ratio) * P)`` tokens. The loop bound is the
   official one: the last group's ``i + 2`` (frame 6 of 8) is *not* pruned in this pass.

So with 8 frames frames 0, 4, 6 stay whole and 1, 2, 3, 5, 7 keep ``int(0.3 * P)`` each. The merge is a
selection: the official code drops the similar tokens, it averages nothing. DyCoke's second stage (dynamic KV-cache
pruning at every decoding step) is not implemented here: this spec is the TTM stage only.

On Video-LLaVA a frame is its ``P = 257`` tokens, CLS first (the CLS is compared with the previous frame's CLS like
any token). The spec is a projector-stage reducer that needs the whole video: the Video-LLaVA family runs it on all
frames at once (``temporal = True``: always global, whatever ``video_options(frames=...)``), and it must be the
last pre-LLM reducer of a chain. Positions: renumbered (pre-LLM).

Deviations from the official code:

* kept tokens stay in frame order and, within a frame, in raster order (the official code concatenates a pruned
  frame's tokens in ascending-similarity order, a side effect of ``topk``); ties go to the lower index (torch
  ``topk`` has no defined tie order);
* ``F <= 4`` (the official second pass stacks an empty list and raises) runs pass 1 only; with an odd ``F`` the
  official code silently drops the last frame, here it is kept whole;
* a padded (invalid) token is never kept while a valid one of its frame remains.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from jaxprune.reducers._core import select_topk
from jaxprune.reducers.base import BudgetError, ProjectorContext, Reduced, ReducerBase, check_budget
from jaxprune.reducers.registry import register


def frame_plan(frames: int) -> dict[int, int]:
    """``{pruned frame: the frame it is compared with}`` of the official loops (later passes override)."""
    plan = {i + 1: i for i in range(0, frames - 1, 2)}
    for i in range(0, frames - 4, 4):
        plan[i + 2] = i
    return plan


@dataclasses.dataclass(frozen=True)
class DyCoke(ReducerBase):
    """TTM on a video of ``frames`` x ``tokens_per_frame`` projected tokens; ``keep`` tokens stay in each pruned
    frame (the official ``int((1 - merging_ratio) * tokens_per_frame)``)."""

    keep: int
    frames: int = 8
    tokens_per_frame: int = 257
    stage: ClassVar[str] = "projector"
    temporal: ClassVar[bool] = True  # needs every frame of the video at once (families: never per frame)

    def __post_init__(self):
        check_budget("DyCoke.frames", self.frames)
        check_budget("DyCoke.tokens_per_frame", self.tokens_per_frame)
        check_budget("DyCoke.keep", self.keep, self.tokens_per_frame)

    @property
    def budget(self) -> int:
        """Tokens of the video after TTM."""
        pruned = len(frame_plan(self.frames))
        return (self.frames - pruned) * self.tokens_per_frame + pruned * self.keep

    def output_tokens(self, available: int) -> int:
        if available != self.frames * self.tokens_per_frame:
            raise BudgetError(f"DyCoke is set for {self.frames} frames x {self.tokens_per_frame} tokens = "
                              f"{self.frames * self.tokens_per_frame} video tokens, the input has {available}")
        return self.budget

    def per_segment(self, n: int) -> "DyCoke":
        raise NotImplementedError("DyCoke merges across frames: it runs on the whole video, never per segment")

    def index(self, features, valid):
        """``(idx [N, S], ok [N, S])``: kept positions in the video's token order."""
        P, plan = self.tokens_per_frame, frame_plan(self.frames)
        x = features.astype(jnp.float32)
        x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)  # F.normalize
        N = x.shape[0]
        idx, ok = [], []
        for f in range(self.frames):
            if f not in plan:
                idx.append(jnp.broadcast_to(jnp.arange(f * P, (f + 1) * P, dtype=jnp.int32), (N, P)))
                ok.append(valid[:, f * P:(f + 1) * P])
                continue
            r = plan[f]
            a, b = x[:, r * P:(r + 1) * P], x[:, f * P:(f + 1) * P]
            # torch cosine_similarity on normalised vectors: a.b / max(|a||b|, 1e-8)
            na, nb = jnp.linalg.norm(a, axis=-1), jnp.linalg.norm(b, axis=-1)
            sim = (a * b).sum(-1) / jnp.maximum(na * nb, 1e-8)
            i, v = select_topk(-sim, self.keep, valid[:, f * P:(f + 1) * P])
            idx.append(i + f * P)
            ok.append(v)
        return jnp.concatenate(idx, axis=1), jnp.concatenate(ok, axis=1)

    def __call__(self, ctx: ProjectorContext) -> Reduced:
        self.output_tokens(ctx.features.shape[1])
        idx, ok = self.index(ctx.features, ctx.valid)
        return Reduced.gather(ctx.features, idx, ok)


def dycoke(merging_ratio: float = 0.7, frames: int = 8, tokens_per_frame: int = 257) -> DyCoke:
    """The official parametrisation: ``merging_ratio`` (``dycoke_k``) of each pruned frame's tokens is dropped."""
    if not 0.0 <= merging_ratio < 1.0:
        raise BudgetError(f"DyCoke merging_ratio={merging_ratio} must be in [0, 1)")
    return DyCoke(keep=max(1, int((1 - merging_ratio) * tokens_per_frame)), frames=frames,
                  tokens_per_frame=tokens_per_frame)


@register("dycoke", model_types=("video_llava",))
def _dycoke(budget: int, cfg) -> DyCoke:
    """``budget`` = the video's tokens after TTM (``cfg.num_frames`` frames): each pruned frame keeps
    ``(budget - whole frames' tokens) // pruned frames``. Video-LLaVA only."""
    if getattr(cfg, "model_type", "llava") != "video_llava":
        raise BudgetError(f"dycoke merges tokens across video frames; {cfg.model_type} models take no video")
    F, P = cfg.num_frames, cfg.tokens_per_frame
    pruned = len(frame_plan(F))
    whole = (F - pruned) * P
    if pruned == 0 or not whole + pruned <= budget < F * P:
        raise BudgetError(f"dycoke budget {budget} out of range: {F} frames keep {F - pruned} whole ({whole} tokens) "
                          f"and >= 1 token of each of the other {pruned}, so budgets lie in [{whole + pruned}, {F * P})")
    return DyCoke(keep=(budget - whole) // pruned, frames=F, tokens_per_frame=P)


__all__ = ["DyCoke", "dycoke", "frame_plan"]

