"""ConsensusDrop ablation on a small random LLaVA: fusion rule x cross-attention source x budget.

For each variant (``fusion`` in rrf/borda/minmax, ``source`` in shallow (K=2 decoder layers)/proxy,
``budget`` in 48/32/16 of 144 visual tokens, i.e. 192/128/64 of 576) on one fixed padded batch:

* agreement of the kept sets between variants (mean Jaccard over images), and with the single-signal
  selections (CLS only = FasterVLM; cross-attention only);
* time of the reducer itself (score + fuse + select + merge, jitted, on a prepared context), of the
  shallow prefill that feeds ``source="shallow"``, and of the LLM prefill on the pruned sequence, next
  to the unpruned prefill;
* fidelity proxy: KL(p_full || p_pruned) and top-1 agreement of the next-token distribution at the
  last prompt position against the unpruned model.

The stages are run with the engine's own building blocks (``jaxprune.models.tower``, ``jaxprune.engine.vision``
/ ``.sequence`` / ``.decoder``), so every compile is shared: the context
(vision tower + projector + shallow text->image attention) once, the LLM once per budget, the
reducer once per variant. One variant per source is checked against ``model(..., reducer=r)``.
Weights are random: the fidelity numbers measure how much a selection perturbs the network's
function, not task accuracy; CPU timings of a small model are dominated by dispatch overhead.

    python -m experiments.ablate_consensusdrop        # ~1-2 min on 2 CPU cores

Writes ``experiments/results/consensusdrop_ablation.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments import timing as T
from experiments.bench_common import (
    git_rev,
    jax_device,
    machine,
    md_table,
    write_results,
)
from jaxprune.config import LlavaConfig, TextConfig, VisionConfig
from jaxprune.engine import decoder as gen
from jaxprune.engine.sequence import place_spans
from jaxprune.engine.vision import text_to_image
from jaxprune.model import Llava
from jaxprune.models.tower import clip_segment, cls_attention
from jaxprune.reducers import gather, select_topk
from jaxprune.reducers.base import ProjectorContext
from jaxprune.reducers.consensusdrop import (
    FUSIONS,
    SOURCES,
    ConsensusDrop,
    consensusdrop,
)
from jaxprune.reducers.fastervlm import FasterVLM

BUDGETS = (48, 32, 16)
SHALLOW = 2
IMG = 511
CMD = "python -m experiments.ablate_consensusdrop"


def ablation_config() -> LlavaConfig:
    """12 x 12 patches (P = 144), CLIP 4 x 64, Llama 4 x 128 (GQA 4/2 heads), vocab 512."""
    return LlavaConfig(
        vision=VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                            image_size=24, patch_size=2),
        text=TextConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=32),
        image_token_index=IMG)


def make_batch(cfg: LlavaConfig, batch: int, seed: int = 0, prefix: int = 8):
    """Left-padded rows: ``prefix`` text ids, one image, a question of 6..24 ids."""
    rng = np.random.default_rng(seed)
    P = cfg.tokens_per_image
    q = rng.integers(6, 25, batch)
    rows = [np.concatenate([rng.integers(3, IMG, prefix), np.full(P, IMG), rng.integers(3, IMG, n)]) for n in q]
    T = max(map(len, rows))
    ids, mask = np.zeros((batch, T), np.int64), np.zeros((batch, T), np.int64)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = r, 1
    px = rng.standard_normal((batch, 3, cfg.vision.image_size, cfg.vision.image_size)).astype(np.float32)
    return ids, mask, px


# ---------------------------------------------------------------------------------------------- stages
def context_fn(graphdef, params, ids, px, valid, *, shallow: int):
    """What ``jaxprune.engine.encode`` hands a projector reducer (no vision-stage reducer, one image per row)."""
    m = nnx.merge(graphdef, params)
    cfg = m.cfg
    is_img = (ids == cfg.image_token_index) & valid
    text_emb = m.embed_text(ids)
    h = m.vision.embed(px)
    tvalid = jnp.ones(h.shape[:2], bool)
    h, q, k = clip_segment(m, h, tvalid, 0, cfg.feature_layer_index)
    cls = cls_attention(q, k, tvalid)
    h, fvalid, cls, k = h[:, 1:], tvalid[:, 1:], cls[:, :, 1:], k[:, 1:]
    feats = m.projector(h)
    t2i = None
    if shallow:
        full = _spans(m, ids, valid, is_img, feats, fvalid, text_emb)[0]
        t2i = text_to_image(m, full, gen.default_positions(valid), valid, is_img, shallow, 32, px.shape[0],
                            feats.shape[1])
    return ProjectorContext(features=feats, valid=fvalid, vision_hidden=h, cls_attn=cls, keys=k,
                            text_embeds=text_emb, text_valid=valid & ~is_img, text_to_image=t2i,
                            grid=(cfg.vision.grid, cfg.vision.grid))


def _spans(m, ids, valid, is_img, feats, fvalid, text_emb):
    """``(h, valid)`` of the LLM input with ``feats [N, k, H]`` in the first ``k`` slots of each image span (the
    other ``P - k`` removed; ``k = P``: the full sequence) -- the engine's placement, one image per row."""
    h, v2, _ = place_spans(ids, valid, is_img, text_emb, feats, fvalid, jnp.ones(fvalid.shape, bool),
                           m.cfg.tokens_per_image, 1)
    return h, v2


def shallow_fn(graphdef, params, ids, valid, feats):
    """The engine's shallow pass alone: K decoder layers on the full sequence -> text->image attention."""
    m = nnx.merge(graphdef, params)
    is_img = (ids == m.cfg.image_token_index) & valid
    text_emb = m.embed_text(ids)
    full = _spans(m, ids, valid, is_img, feats, jnp.ones(feats.shape[:2], bool), text_emb)[0]
    return text_to_image(m, full, gen.default_positions(valid), valid, is_img, SHALLOW, 32, feats.shape[0],
                         feats.shape[1])


def last_logits_fn(graphdef, params, ids, valid, feats, fvalid):
    """Next-token logits ``[B, V]`` of the LLM prefill with ``feats [B, k, H]`` in the image span."""
    m = nnx.merge(graphdef, params)
    is_img = (ids == m.cfg.image_token_index) & valid
    text_emb = m.embed_text(ids)
    h, v2 = _spans(m, ids, valid, is_img, feats, fvalid, text_emb)
    logits = gen.full_logits(m, h, gen.default_positions(v2), v2)
    return jnp.take_along_axis(logits, gen.last_valid_index(v2)[:, None, None], axis=1)[:, 0]


class Timing(NamedTuple):
    wall_ms: float  # best of the timed runs
    cpu_ms: float   # median process CPU time (all threads) of the timed runs: robust to a shared CPU

    def __str__(self) -> str:
        return f"{self.wall_ms:.2f} / {self.cpu_ms:.2f}"


def timeit(fn, repeats: int) -> Timing:
    """Wall (best of ``repeats``) and CPU (median) time of ``fn()`` after one warm-up
    (:func:`experiments.timing.measure`). The CPU here is shared with other jobs: wall-clock minima still carry
    their noise, CPU time measures the work itself."""
    t = T.measure(fn, repeats)
    return Timing(1e3 * min(t.samples), 1e3 * float(np.median(t.cpu_samples)))


def kl_top1(full: np.ndarray, pruned: np.ndarray) -> tuple[float, float]:
    lp = jax.nn.log_softmax(jnp.asarray(full, jnp.float32))
    lq = jax.nn.log_softmax(jnp.asarray(pruned, jnp.float32))
    kl = np.asarray(jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1))
    return float(kl.mean()), float((full.argmax(-1) == pruned.argmax(-1)).mean())


def jaccard(a: list[set], b: list[set]) -> float:
    return float(np.mean([len(x & y) / max(len(x | y), 1) for x, y in zip(a, b)]))


def kept_sets(index: np.ndarray, valid: np.ndarray) -> list[set]:
    return [set(index[i][valid[i]].tolist()) for i in range(index.shape[0])]


def single_signal(scores, ctx: ProjectorContext, k: int):
    idx, ok = select_topk(scores, k, ctx.valid)
    return gather(ctx.features, idx), idx, ok


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()

    cfg = ablation_config()
    model = Llava.random(cfg, seed=0)
    ids_np, mask_np, px_np = make_batch(cfg, args.batch)
    p = model.plan(ids_np, px_np, mask_np)  # unreduced rows (HF layout, bucketed): each image span P slots
    ids, px, valid = p.arrays["input_ids"], p.arrays["pixel_values"], p.arrays["valid"]
    gd, params = model.graphdef, model.params
    ctx_jit = jax.jit(context_fn, static_argnums=0, static_argnames="shallow")
    llm_jit = jax.jit(last_logits_fn, static_argnums=0)

    ctx = {"shallow": ctx_jit(gd, params, ids, px, valid, shallow=SHALLOW),
           "proxy": ctx_jit(gd, params, ids, px, valid, shallow=0)}
    t_vision = timeit(lambda: jax.block_until_ready(ctx_jit(gd, params, ids, px, valid, shallow=0).features),
                      args.repeats)
    sh_jit = jax.jit(shallow_fn, static_argnums=0)
    np.testing.assert_allclose(np.asarray(sh_jit(gd, params, ids, valid, ctx["proxy"].features)),
                               np.asarray(ctx["shallow"].text_to_image), rtol=1e-5, atol=1e-7)
    t_shallow = timeit(lambda: jax.block_until_ready(sh_jit(gd, params, ids, valid, ctx["proxy"].features)),
                       args.repeats)
    full_fv = jnp.ones(ctx["proxy"].valid.shape, bool)
    full_logits = np.asarray(llm_jit(gd, params, ids, valid, ctx["proxy"].features, full_fv))
    t_full = timeit(lambda: jax.block_until_ready(llm_jit(gd, params, ids, valid, ctx["proxy"].features, full_fv)),
                    args.repeats)
    ref = np.asarray(model(ids_np, px_np, attention_mask=mask_np).logits)  # the library's unpruned forward
    last = mask_np.shape[1] - 1  # left padding: every row ends at the last column
    np.testing.assert_allclose(full_logits, ref[:, last], atol=2e-4, rtol=2e-4)
    lp = jax.nn.log_softmax(jnp.asarray(full_logits))
    entropy = float(-jnp.sum(jnp.exp(lp) * lp, axis=-1).mean())

    rows, kept, t_prefill = [], {}, {}
    for budget in BUDGETS:
        variants: dict[str, tuple] = {}
        for source, fusion in itertools.product(SOURCES, FUSIONS):
            variants[f"{source}/{fusion}"] = (consensusdrop(budget, source=source, fusion=fusion), ctx[source])
        variants["shallow/rrf, no merge"] = (consensusdrop(budget, merge=False), ctx["shallow"])
        variants["proxy/rrf, no merge"] = (consensusdrop(budget, source="proxy", merge=False), ctx["proxy"])
        variants["CLS only (FasterVLM)"] = (FasterVLM(budget), ctx["proxy"])
        xr = ConsensusDrop(budget, source="proxy")
        variants["X only (shallow)"] = (
            lambda c, k=budget: single_signal(c.text_to_image, c, k), ctx["shallow"])
        variants["X only (proxy)"] = (
            lambda c, k=budget, r=xr: single_signal(r.cross_attention(c), c, k), ctx["proxy"])
        for name, (red, c) in variants.items():
            f = jax.jit(red)
            out = f(c)
            toks, idx, ok = (out.tokens, out.index, out.valid) if hasattr(out, "tokens") else out
            t_red = timeit(lambda f=f, c=c: jax.block_until_ready(f(c)), args.repeats)
            logits = np.asarray(llm_jit(gd, params, ids, valid, toks, ok))
            if budget not in t_prefill:
                t_prefill[budget] = timeit(lambda t=toks, o=ok: jax.block_until_ready(llm_jit(gd, params, ids, valid, t, o)),
                                           args.repeats)
            if budget == BUDGETS[1] and name in ("shallow/rrf", "proxy/borda"):  # library path == ablation path
                lib = model(ids_np, px_np, attention_mask=mask_np, reducer=red)
                np.testing.assert_array_equal(np.asarray(lib.kept), np.where(np.asarray(ok), np.asarray(idx), -1))
                np.testing.assert_allclose(logits, np.asarray(lib.logits)[:, -1], atol=2e-4, rtol=2e-4)
            kl, top1 = kl_top1(full_logits, logits)
            kept[(budget, name)] = kept_sets(np.asarray(idx), np.asarray(ok))
            signal = t_shallow if name.startswith(("shallow", "X only (shallow)")) else Timing(0.0, 0.0)
            rows.append(dict(budget=budget, variant=name, kl=kl, top1=top1, reducer=t_red._asdict(),
                             shallow_pass=signal._asdict(), prefill=t_prefill[budget]._asdict()))

    # Jaccard agreement
    names6 = [f"{s}/{f}" for s, f in itertools.product(SOURCES, FUSIONS)]
    refs = ["CLS only (FasterVLM)", "X only (shallow)", "X only (proxy)"]
    jac = {budget: {a: {b_: jaccard(kept[(budget, a)], kept[(budget, b_)]) for b_ in names6 + refs}
                    for a in names6 + refs} for budget in BUDGETS}
    for r in rows:
        r["jaccard_vs_cls"] = jac[r["budget"]].get(r["variant"], {}).get("CLS only (FasterVLM)")
        r["jaccard_vs_shallow_rrf"] = jac[r["budget"]].get(r["variant"], {}).get("shallow/rrf")
        if r["jaccard_vs_cls"] is None:
            r["jaccard_vs_cls"] = jaccard(kept[(r["budget"], r["variant"])], kept[(r["budget"], refs[0])])
            r["jaccard_vs_shallow_rrf"] = jaccard(kept[(r["budget"], r["variant"])], kept[(r["budget"], "shallow/rrf")])
    runtime = time.perf_counter() - t_start
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())

    # ---- report
    fmt = lambda x, d=3: f"{x:.{d}f}"
    table = md_table(["budget", "variant", "KL(full‖pruned)", "top-1 agree", "J vs CLS-only", "J vs shallow/rrf",
                      "reducer ms", "shallow pass ms", "pruned LLM prefill ms"],
                     [[r["budget"], r["variant"], fmt(r["kl"], 4), fmt(r["top1"], 3), fmt(r["jaccard_vs_cls"], 2),
                       fmt(r["jaccard_vs_shallow_rrf"], 2), Timing(**r["reducer"]), Timing(**r["shallow_pass"]),
                       Timing(**r["prefill"])] for r in rows])
    mid = BUDGETS[1]
    jtab = md_table(["", *names6, *[n.split(" (")[0] + " " + n.split(" (")[1][:-1] for n in refs]],
                    [[a, *[fmt(jac[mid][a][b_], 2) for b_ in names6 + refs]] for a in names6])
    by = {(r["budget"], r["variant"]): r for r in rows}

    def mean_over(key, names):
        return float(np.mean([by[(bb, n)][key] for bb in BUDGETS for n in names]))

    summary_names = names6 + ["shallow/rrf, no merge", "proxy/rrf, no merge"] + refs
    summary = md_table(["variant", "mean KL(full‖pruned)", "mean top-1 agree", "mean J vs CLS-only"],
                       [[n, fmt(mean_over("kl", [n]), 4), fmt(mean_over("top1", [n]), 3),
                         fmt(mean_over("jaccard_vs_cls", [n]), 2)] for n in summary_names])
    head = [
        "- mean Jaccard shallow vs proxy (same fusion, over budgets): " + ", ".join(
            f"{f} {np.mean([jac[bb][f'shallow/{f}'][f'proxy/{f}'] for bb in BUDGETS]):.2f}" for f in FUSIONS),
        ("- mean Jaccard rrf vs borda / rrf vs minmax (shallow): "
         f"{np.mean([jac[bb]['shallow/rrf']['shallow/borda'] for bb in BUDGETS]):.2f} / "
         f"{np.mean([jac[bb]['shallow/rrf']['shallow/minmax'] for bb in BUDGETS]):.2f}"),
        (f"- time (wall best / CPU median, ms): unpruned LLM prefill {t_full}; pruned prefill " + ", ".join(
            f"{bb}: {t_prefill[bb]}" for bb in BUDGETS)
         + f"; shallow K={SHALLOW} text->image pass {t_shallow}; vision tower + projector {t_vision}; "
           "reducer alone (mean over budgets): " + ", ".join(
               f"{n} {np.mean([by[(bb, n)]['reducer']['cpu_ms'] for bb in BUDGETS]):.2f}" for n in names6)
           + " (CPU ms)")]
    md = f"""# ConsensusDrop ablation (small random LLaVA)

Command: `{CMD}` (git {git_rev()}, batch {args.batch}, best of {args.repeats} timed runs, total {runtime:.0f} s wall).
Machine: {machine()}; device {jax_device()}.
Model: random `Llava.random(ablation_config(), seed=0)`: CLIP 4 x 64 (P = 144 visual tokens), Llama 4 x 128
(GQA 4/2), vocab 512; {args.batch} left-padded rows (8 prefix ids, 1 image, 6-24 question ids), fp32.
Unpruned next-token entropy {entropy:.2f} nats (uniform: {np.log(cfg.text.vocab_size):.2f}).
Budgets 48/32/16 of 144 mirror 192/128/64 of 576. Shallow source: K = {SHALLOW} decoder layers, 32 query rows.

**Caveats.** Weights are random, so KL / top-1 measure how much a selection perturbs the network's
function (not accuracy); the two signals of a random model are nearly independent, so this stresses
the fusion rules more than a trained model would. Timings are CPU, tiny model: dispatch-dominated.
The unpruned next-token distribution is nearly uniform, so top-1 flips under tiny logit changes: read
KL first. Times are "wall ms (best of N) / CPU ms (median process time, both cores)".
"reducer ms" = the jitted reducer on a prepared context (the proxy's similarity is inside
it); "shallow pass ms" = the extra K-layer pass of the plan that feeds source="shallow" (timed
alone); "pruned LLM prefill ms" = full-depth LLM prefill on the pruned sequence (the same for every
variant of a budget; sequences are padded to multiples of 32: 192 unpruned, 96/80/64 pruned). The
CPU was shared with other jobs (load average {load}), so wall times are noisy; the CPU times are the steadier measure.
Checked: the ablation's stage-by-stage path gives the same kept indices and logits as
`model(..., reducer=r)` (shallow/rrf and proxy/borda at budget {mid}).

## Headline (means over budgets 48/32/16)

{summary}

{chr(10).join(head)}

## All variants

{table}

## Kept-set agreement at budget {mid} (mean Jaccard over {args.batch} images)

{jtab}
"""
    data = dict(command=CMD, machine=machine(), load_average=load, device=jax_device(), git=git_rev(), batch=args.batch,
                budgets=BUDGETS, shallow_layers=SHALLOW, runtime_s=runtime, unpruned_prefill=t_full._asdict(),
                vision=t_vision._asdict(), shallow_pass=t_shallow._asdict(), full_entropy=entropy, rows=rows,
                jaccard={str(bb): jac[bb] for bb in BUDGETS})
    print(md)
    if not args.no_write:
        for p in write_results("consensusdrop_ablation", md, data):
            print("wrote", p)


if __name__ == "__main__":
    main()
