"""Training through the reducer path: logits of the *reduced* sequence, labels mapped onto its layout, and
the LoRA loss / AdamW step (data parallel over a ``data`` mesh axis).

The forward is the inference forward of ``model(..., reducer=r)`` (:mod:`jaxprune.engine`):
:func:`jaxprune.engine.encode` (family tower, pre-LLM stages, placement), then the decoder run in segments with
:func:`jaxprune.engine.cuts.cut` between them -- the same functions, without KV caches. Every cut is a
gather at indices that do not depend on the parameters, so the loss is differentiable in the weights (no
gradient flows through the index choice; ADSC's indices depend on validity only).

Output layout. Pre-LLM compaction and in-LLM cuts only remove *visual* slots and keep every other slot
(text and padding) in its order; the surviving visual tokens sit in the remaining visual slots. So the
``k``-th non-visual slot of the output is the ``k``-th non-visual slot of the input, and the answer labels
(which sit on text slots: an answer never directly follows an image token) move with them. Labels on visual
slots (none in LLaVA's format) are dropped; visual output slots get -1. :func:`map_labels` implements
exactly this, from the visual maps of the input and of the final segment.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments.train.loss import token_xent
from jaxprune import engine, families
from jaxprune.engine import cuts
from jaxprune.engine import decoder as gen
from jaxprune.lora import LoraConfig, apply_lora
from jaxprune.models.llava import LlavaModule
from jaxprune.reducers.compose import as_tuple


def reduced_forward(m: LlavaModule, reducers: tuple, input_ids: jax.Array, valid: jax.Array,
                    pixel_values: jax.Array | None = None, features: jax.Array | None = None):
    """``(logits [B, T_out, V], valid_out [B, T_out], is_visual_in [B, T], is_visual_out [B, T_out])``.

    ``pixel_values [N, C, S, S]`` (N a multiple of B, the same image count per row) run the whole model;
    ``features [N, P, H]`` (projector outputs, :meth:`LlavaModule.image_features`) skip the frozen vision
    tower -- only for reducers without vision/projector stages. Rows must be right padded, with exactly
    ``N / B * P`` image tokens each (host-checked by the callers)."""
    reducers = tuple(reducers)
    B = input_ids.shape[0]
    img = m.cfg.image_token_index
    is_vis_in = (input_ids == img) & valid
    if features is not None:
        if any(r.stage != "llm" for r in reducers):
            raise ValueError("precomputed features only work with in-LLM reducers (pre-LLM stages need pixels)")
        h, valid2 = m.merge(input_ids, features), valid
        pos, is_vis = gen.default_positions(valid), is_vis_in
        n_vis = (features.shape[0] // B) * features.shape[1]
    else:
        h, valid2, pos, is_vis, n_vis = encode_reduced(m, reducers, input_ids, valid, pixel_values)
    L = len(m.language.layers)
    vis_idx = cuts.visual_slots(is_vis, n_vis)
    vis_valid = jnp.take_along_axis(valid2, vis_idx, axis=1)
    start = 0
    for r in [r for r in reducers if r.stage == "llm"] + [None]:
        stop = L if r is None else r.layer
        h, _, qk = gen.decoder_prefill(m, h, pos, valid2, range(start, stop), 0, return_qk=True)
        if r is None:
            break
        h, valid2, pos, vis_idx, vis_valid, _ = cuts.cut(m, r, h, valid2, pos, vis_idx, vis_valid, qk)
        start = stop
    rows = jnp.arange(B)[:, None]
    is_vis_out = jnp.zeros(valid2.shape, bool).at[rows, vis_idx].set(True)
    return m.logits(h), valid2, is_vis_in, is_vis_out


def encode_reduced(m: LlavaModule, reducers: tuple, input_ids: jax.Array, valid: jax.Array,
                   pixel_values: jax.Array):
    """The LLM input of ``reducers`` on rows in the HF layout (every image span ``P`` placeholders):
    :func:`jaxprune.engine.encode` with the family's static layout, its canonical spans kept at ``P`` slots
    (the inference path shortens them to ``S_h`` on the host first; the placement then keeps the same first
    ``S`` slots of each span). Returns ``(h, valid, positions, is_visual, n_visual)``."""
    cfg = m.cfg
    ipr = pixel_values.shape[0] // input_ids.shape[0]
    fam = families.get(cfg.model_type)
    layout = dataclasses.replace(fam.static(cfg, reducers, None, ipr, None), S_h=cfg.tokens_per_image)
    static = engine.EngineStatic(cfg.model_type, layout, reducers, True)
    arrays = {"input_ids": input_ids, "valid": valid, "pixel_values": pixel_values,
              "tables": fam.tables(cfg, None, layout)}
    h, valid2, pos, is_vis, n_vis, _, _ = engine.encode(m, static, arrays)
    return h, valid2, pos, is_vis, n_vis


def map_labels(labels: jax.Array, is_visual_in: jax.Array, is_visual_out: jax.Array, n_visual_in: int
               ) -> jax.Array:
    """Labels ``[B, T]`` of the input layout -> ``[B, T_out]`` of the reduced layout (module docstring).

    ``n_visual_in`` (static) = image tokens per row of the input; ``T_out - n_visual_out = T - n_visual_in``."""
    B, T = labels.shape
    n_text = T - n_visual_in
    src = jnp.argsort(is_visual_in, axis=1, stable=True)[:, :n_text]   # non-visual input slots, in order
    dst = jnp.argsort(is_visual_out, axis=1, stable=True)[:, :n_text]  # non-visual output slots, in order
    moved = jnp.take_along_axis(labels, src, axis=1)
    return jnp.full(is_visual_out.shape, -1, labels.dtype).at[jnp.arange(B)[:, None], dst].set(moved)


def reduced_xent(m: LlavaModule, reducers: tuple, batch: Mapping[str, jax.Array]):
    """Answer-token cross-entropy of the reduced forward: ``(loss, (tokens, hits))``."""
    feats = batch.get("features")
    px = batch.get("pixel_values")
    logits, _, vin, vout = reduced_forward(m, reducers, batch["input_ids"], batch["valid"], px, feats)
    n_img = (feats if feats is not None else px).shape[0] // batch["input_ids"].shape[0]
    labels = map_labels(batch["labels"], vin, vout, n_img * m.cfg.tokens_per_image)
    loss, n, hits = token_xent(logits, labels)
    return loss, (n, hits)


def lora_loss(graphdef: Any, lora_cfg: LoraConfig, adapters, base_params, batch, reducer):
    """Pure, jittable (``reducer`` static): the loss of the base model + adapters with ``reducer`` active.

    ``reducer=None`` is the full model (no cut)."""
    m = nnx.merge(graphdef, apply_lora(base_params, adapters, lora_cfg))
    return reduced_xent(m, () if reducer is None else as_tuple(reducer), batch)


def check_batch(batch: Mapping[str, np.ndarray], image_token_index: int, tokens_per_image: int) -> None:
    """Host-side: right padding and exactly ``images_per_row * P`` image tokens in every row."""
    ids, valid = np.asarray(batch["input_ids"]), np.asarray(batch["valid"], bool)
    imgs = batch.get("features", batch.get("pixel_values"))
    ipr = np.shape(imgs)[0] // ids.shape[0]
    counts = ((ids == image_token_index) & valid).sum(1)
    if not (counts == ipr * tokens_per_image).all():
        raise ValueError(f"image tokens per row {counts.tolist()}: every row needs {ipr} x {tokens_per_image}")
    if (np.diff(valid.astype(np.int8), axis=1) > 0).any():
        raise ValueError("training batches must be right padded (valid prefix per row)")


def _norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


# ---------------------------------------------------------------------------------------------------
class LoraTrainer:
    """AdamW on the adapters with the base model frozen; batch sharded over ``mesh``'s ``data`` axis,
    parameters, adapters and optimizer state replicated. One compile per (batch shape, reducer)."""

    def __init__(self, model, lora_cfg: LoraConfig, optimizer, mesh=None):
        from jax.sharding import NamedSharding, PartitionSpec as P

        from jaxprune.eval import distributed as dist

        self.model, self.lora_cfg, self.optimizer = model, lora_cfg, optimizer
        self.mesh = dist.make_mesh() if mesh is None else mesh
        self.replicated = NamedSharding(self.mesh, P())
        self.data = NamedSharding(self.mesh, P(dist.AXIS))
        self.base_params = dist.replicate(model.params, self.mesh)
        loss = functools.partial(lora_loss, model.graphdef, lora_cfg)

        def step(adapters, opt_state, base_params, batch, reducer):
            (value, (n, hits)), grads = jax.value_and_grad(loss, has_aux=True)(adapters, base_params, batch, reducer)
            updates, opt_state = optimizer.update(grads, opt_state, adapters)
            adapters = optax.apply_updates(adapters, updates)
            return adapters, opt_state, {"loss": value, "tokens": n, "hits": hits, "grad_norm": _norm(grads)}

        def evaluate(adapters, base_params, batch, reducer):
            value, (n, hits) = loss(adapters, base_params, batch, reducer)
            return {"loss": value, "tokens": n, "hits": hits}

        donate = (0, 1) if jax.default_backend() != "cpu" else ()  # CPU cannot donate (it would only warn)
        self.step_fn = jax.jit(step, static_argnames=("reducer",), donate_argnums=donate,
                               out_shardings=self.replicated)
        self.eval_fn = jax.jit(evaluate, static_argnames=("reducer",), out_shardings=self.replicated)

    def init(self, adapters):
        """``(adapters, opt_state)`` placed on the mesh."""
        from jaxprune.eval import distributed as dist

        adapters = dist.replicate(adapters, self.mesh)
        return adapters, dist.replicate(self.optimizer.init(adapters), self.mesh)

    def shard(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """Global arrays from this process' rows (single process: the whole batch); rows must divide
        over the ``data`` axis."""
        from jaxprune.eval import distributed as dist

        cfg = self.model.cfg
        check_batch(batch, cfg.image_token_index, cfg.tokens_per_image)
        n = self.mesh.devices.size
        rows = np.shape(batch["input_ids"])[0] * jax.process_count()
        if rows % n:
            raise ValueError(f"global batch of {rows} rows does not divide over {n} devices")
        out = {}
        for k, v in batch.items():
            v = np.asarray(v)
            if k in ("pixel_values", "features"):
                v = v.astype(self.model.dtype)
            out[k] = dist.to_global(v, self.mesh, v.shape[0] * jax.process_count())
        return out

    def step(self, adapters, opt_state, batch, reducer):
        return self.step_fn(adapters, opt_state, self.base_params, batch, reducer=reducer)

    def evaluate(self, adapters, batch, reducer):
        return self.eval_fn(adapters, self.base_params, batch, reducer=reducer)
