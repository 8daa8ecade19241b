"""LLaVA-OneVision speed at its real token counts: TTFT, decode ms/token and KV bytes of one anyres image and one
8-frame video, full and at reduced budgets, CPU, fp32, random weights, batch 1 (issue 18).

Config (:func:`onevision_config`): the real visual geometry at reduced width -- SigLIP 6 x 256 (4 heads, inter 1024,
384 px, patch 14: 27 x 27 = 729 tokens per crop, no CLS, feature layer -1, "full"), the released
``image_grid_pinpoints`` (every ``(384 i, 384 j)``, ``i, j = 1..6``: 36 grids, at most 1 + 36 = 37 crops) and
``anyres_max_9``; Qwen2 8 x 512 (8 query heads of 64, 2 KV heads, q/k/v biases, inter 1376 as the other CPU
benches, rope theta 1e6) with a reduced vocab of 32064 (a 152k vocab would make the 512-wide LM head most of a decode
step). Rows:

* **image**: one 480 x 640 (h x w) photo alone in its prompt: anyres grid 2 x 2 + the base crop = 5 crops; its
  placeholders are the base crop's 729 tokens + the unpadded 40 x 54 tile grid + 40 newlines = 2929 (the family's
  count, :func:`jaxprune.models.onevision_pack.image_tokens`, checked against HF ``LlavaOnevisionProcessor.
  _get_number_of_features`` when transformers is importable);
* **video**: 8 frames, each 27 x 27 bilinearly pooled to 14 x 14 = 196 tokens, + one newline = 1569 tokens.

Each prompt is a 5-token prefix, the visual placeholders and a 20-token question. Budgets (``--fractions``, default
1/4 and 1/9 for the image, 1/4 for the video) count the span's tokens reaching the LLM, newlines included, and are
built with ``registry.make(name, budget, cfg)`` as ``jaxprune-eval --reducer NAME:BUDGET`` builds them (on
OneVision: projector-stage methods keep ``budget`` tokens of the span; FastV keeps ``budget`` after layer 2;
vision-stage methods split the budget over the span's crop slots -- for an image the bucketed crop count of the
batch, 6 slots for the 5-crop photo -- with :mod:`jaxprune.families.onevision_spans`' CLS-free saliency
surrogate). A reduced image row's span has the batch-sized static slot count of ``onevision_spans`` (the bucket
ladder value >= the real span: 3072 slots for the 2929-token photo, not the config's 8829).

Method (:mod:`experiments.timing`, as ``bench_video``): one warm-up call per program (``first_s``, compile
included); a reducer row's prefill is timed in ABBA rounds with the full model's prefill of the same input
(speedup = median of the per-round ratios); decode = slope of a least-squares fit of the decode loop's time at
several lengths, refused when not positive or not growing; compile (lower + compile of the prefill) timed apart.
FLOPs: :func:`prefill_flops` (``jaxprune.flops.prefill_cost``'s OneVision count on the static layout the program
really runs -- bucketed crops, span slots, segments; equal to ``prefill_cost(image_tokens=..., crops=...)`` of the
image for image rows, checked) plus the
ConsensusDrop shallow pass (``bench_budgets.shallow_flops``); the FLOPs limit = FLOPs_full / FLOPs_row.

    python -m experiments.bench_onevision [--repeats 3] [--tiny] [--dry-run] [--out STEM] [--wait-quiet MIN]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys
import time

import jax
import numpy as np

import jaxprune as jp
from experiments import timing as T
from experiments.bench_budgets import shallow_flops
from experiments.bench_common import git_rev, jax_device, md_table, write_results
from jaxprune import engine, flops
from jaxprune.config import LlavaConfig, TextConfig, VisionConfig
from jaxprune.engine.cuts import check_llm_reducers
from jaxprune.engine.plan import split_reducer
from jaxprune.models.onevision_pack import image_tokens, max_patches, pooled_side
from jaxprune.processing_anyres import anyres_grid, check_pinpoints, max_crops
from jaxprune.reducers import registry

PREFIX, QUESTION, NEW = 5, 20, 16
#: llava-onevision-qwen2-{0.5b,7b,72b}-ov(-hf) ``image_grid_pinpoints``: every (384 i, 384 j), i, j = 1..6
PINPOINTS = tuple((384 * i, 384 * j) for i in range(1, 7) for j in range(1, 7))
IMAGE_HW, FRAMES = (480, 640), 8
IMAGE_REDUCERS = ("fastervlm", "visionzip", "fastv", "consensusdrop")
VIDEO_REDUCERS = ("fastervlm", "visionzip", "fastv")
IMAGE_FRACTIONS, VIDEO_FRACTIONS = (4, 9), (4,)
TINY = {"pins": tuple((37 * i, 37 * j) for i in range(1, 4) for j in range(1, 4)), "hw": (50, 66), "frames": 4,
        "cap": "anyres_max_4", "image_fractions": (4,)}


@dataclasses.dataclass(frozen=True)
class Row:
    """One measured row: the input kind, the reducer name (``full``: none) and its budget (span tokens)."""

    kind: str     # "image" | "video"
    name: str
    budget: int


def onevision_config(tiny: bool = False) -> LlavaConfig:
    """The reduced-width OneVision config at the real visual geometry (``tiny``: SigLIP 37 px / patch 7, 5 x 5
    patches per crop, pinpoints up to 3 x 3 tiles, ``anyres_max_4``; a 4-layer decoder of width 32)."""
    if tiny:
        v = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         image_size=37, patch_size=7, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                         kind="siglip")
        t = TextConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6,
                       rope_theta=1e6, kind="qwen2", eos_token_id=(2,), pad_token_id=0)
        return LlavaConfig(vision=v, text=t, model_type="llava_onevision", image_token_index=298,
                           video_token_index=299, vision_feature_layer=-1, vision_feature_select_strategy="full",
                           image_grid_pinpoints=TINY["pins"], vision_aspect_ratio=TINY["cap"])
    v = VisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4,
                     image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, kind="siglip")
    t = TextConfig(vocab_size=32064, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                   num_attention_heads=8, num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-6, rope_theta=1e6,
                   max_position_embeddings=32768, kind="qwen2", eos_token_id=(2,), pad_token_id=0)
    return LlavaConfig(vision=v, text=t, model_type="llava_onevision", image_token_index=32000,
                       video_token_index=32001, vision_feature_layer=-1, vision_feature_select_strategy="full",
                       image_grid_pinpoints=PINPOINTS, vision_aspect_ratio="anyres_max_9")


def hf_image_tokens(cfg: LlavaConfig, h: int, w: int) -> int | None:
    """HF ``LlavaOnevisionProcessor._get_number_of_features`` for ``cfg``'s geometry, computed in a subprocess (it
    imports torch, which the timed process should not load); None when transformers is not importable there."""
    S, g = cfg.vision.image_size, cfg.vision.grid
    code = ("import json, sys\n"
            "from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor as P\n"
            "a = json.loads(sys.argv[1])\n"
            "p = P.__new__(P)\n"
            "p.num_image_tokens, p.vision_aspect_ratio = a['g'] * a['g'], a['cap']\n"
            "p.image_processor = type('IP', (), {'image_grid_pinpoints': a['pins']})()\n"
            "print(int(p._get_number_of_features(a['h'], a['w'], a['S'], a['S'])))\n")
    arg = json.dumps({"g": g, "cap": cfg.vision_aspect_ratio, "pins": [list(p) for p in cfg.image_grid_pinpoints],
                      "h": int(h), "w": int(w), "S": S})
    try:
        res = subprocess.run([sys.executable, "-c", code, arg], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = res.stdout.split()
    return int(lines[-1]) if res.returncode == 0 and lines else None


def token_counts(cfg: LlavaConfig, hw: tuple[int, int], frames: int) -> dict:
    """The image's crops / grid / placeholder count and the video's (raises if HF's count differs)."""
    S, g = cfg.vision.image_size, cfg.vision.grid
    pins = check_pinpoints(cfg.image_grid_pinpoints, S)
    gh, gw = anyres_grid(hw, pins, S)
    n_img = image_tokens(hw[0], hw[1], pins, S, g, max_patches(cfg.vision_aspect_ratio))
    hf = hf_image_tokens(cfg, *hw)
    if hf is not None and hf != n_img:
        raise AssertionError(f"image {hw}: the family counts {n_img} tokens, HF's processor {hf}")
    q = pooled_side(g)
    return {"image_hw": list(hw), "grid": [gh, gw], "crops": 1 + gh * gw, "patches_per_crop": g * g,
            "image_tokens": n_img, "image_tokens_hf": hf, "frames": frames, "pooled_side": q,
            "video_tokens": frames * q * q + 1, "max_image_tokens": cfg.max_image_tokens}


def make_inputs(cfg: LlavaConfig, kind: str, counts: dict) -> dict:
    """Keyword inputs of one prompt: ``input_ids [1, T]`` (prefix, placeholders, question) and the pixels."""
    rng = np.random.default_rng(0)
    hi = min(cfg.text.vocab_size, cfg.image_token_index, cfg.video_token_index) - 1
    S = cfg.vision.image_size
    n, tok = ((counts["image_tokens"], cfg.image_token_index) if kind == "image"
              else (counts["video_tokens"], cfg.video_token_index))
    ids = np.concatenate([rng.integers(3, hi, (1, PREFIX)), np.full((1, n), tok), rng.integers(3, hi, (1, QUESTION))],
                         axis=1)
    if kind == "image":
        px = rng.standard_normal((1, counts["crops"], 3, S, S)).astype(np.float32)
        return {"input_ids": ids, "pixel_values": px, "image_sizes": np.array([counts["image_hw"]])}
    px = rng.standard_normal((1, counts["frames"], 3, S, S)).astype(np.float32)
    return {"input_ids": ids, "pixel_values_videos": px}


def rows_for(counts: dict, image_reducers, video_reducers, image_fractions, video_fractions) -> list[Row]:
    """Full + every reducer at ``round(tokens / f)`` for each fraction ``1/f``, image rows then video rows."""
    out = []
    for kind, names, fracs in (("image", image_reducers, image_fractions), ("video", video_reducers, video_fractions)):
        n = counts[f"{kind}_tokens"]
        out.append(Row(kind, "full", n))
        out += [Row(kind, name, max(2, round(n / f))) for f in fracs for name in names]
    return out


def siglip_layer(cfg: LlavaConfig, s: int) -> float:
    """FLOPs of one SigLIP layer on ``s`` tokens (``jaxprune.flops``' tower-layer count)."""
    d, i = cfg.vision.hidden_size, cfg.vision.intermediate_size
    return 2 * s * 4 * d * d + 2 * 2 * s * s * d + 2 * 2 * s * d * i


def prefill_flops(cfg: LlavaConfig, static, spec, text_tokens: int, span_tokens: int) -> flops.PrefillCost:
    """:func:`jaxprune.flops.prefill_cost`'s OneVision count on the layout a plan really runs (``static`` =
    ``plan.static.layout``; video spans included, which ``prefill_cost`` cannot see): the tower on every crop slot
    the program computes (bucketed crops, or the vision-stage span's crop slots), the projector on their patches,
    the decoder on ``text_tokens`` + the span's slots per segment (unreduced: ``span_tokens`` placeholders)."""
    v, c = cfg.vision, cfg.text
    reducers = split_reducer(spec)[0] if spec is not None else ()
    P, L = v.num_patches, cfg.feature_layer_index
    n = static.crops if static.vision else static.Tc
    cost = 2 * P * v.patch_size ** 2 * v.num_channels * v.hidden_size
    s, done = P, 0
    for r in (static.specs if static.vision else ()):
        cut = L if r.vision_layer is None else r.vision_layer
        cost += sum(siglip_layer(cfg, s) for _ in range(done, cut))
        done, s = cut, r.output_tokens(s) - 1
    vision = n * (cost + sum(siglip_layer(cfg, s) for _ in range(done, L)))
    projector = n * 2 * s * (v.hidden_size * c.hidden_size + c.hidden_size ** 2)
    span, pool = (static.S, static.V) if reducers else (span_tokens, span_tokens)
    counts = check_llm_reducers(cfg, reducers, 1, pool)
    llm_cuts = [r for r in reducers if r.stage == "llm"]
    fixed = text_tokens + span - pool
    segs, start = [], 0
    for k, stop in zip(counts, [r.layer for r in llm_cuts] + [c.num_hidden_layers]):
        segs.append((stop - start, fixed + k))
        start = stop
    llm = sum(m * flops.llm_layer(cfg, t) for m, t in segs) + 2 * c.hidden_size * c.vocab_size
    fv = sum(m * flops.fastv_layer(cfg, t) for m, t in segs)
    cut = sum(flops.cut_cost(cfg, r, fixed + k, k) for r, k in zip(llm_cuts, counts))
    return flops.PrefillCost(vision=vision, projector=projector, llm_swiglu=llm, llm_fastv_formula=fv,
                             segments=tuple(segs), visual_tokens=tuple(counts), llm_cuts=cut)


def row_flops(model, p, spec, kind: str, span_tokens: int) -> dict:
    """FLOPs of a plan's prefill (+ the shallow pass) and, for image rows, the check against ``prefill_cost``."""
    cfg, lay = model.cfg, p.static.layout
    T_ = p.batch_shape[1]
    text = T_ - (lay.S_h if spec is not None else span_tokens)
    cost = prefill_flops(cfg, lay, spec, text, span_tokens)
    shallow = 0.0 if spec is None else shallow_flops(cfg, spec, T_, 1)
    out = {"flops_vision": cost.vision, "flops_projector": cost.projector, "flops_llm": cost.llm_swiglu,
           "flops_llm_cuts": cost.llm_cuts, "flops_shallow": shallow, "flops_total": cost.total + shallow,
           "segments": [list(s) for s in cost.segments], "text_slots": text,
           "kv_bytes_analytic": flops.kv_cache_bytes(cfg, cost, 1, NEW + 1, model.dtype.itemsize)}
    if kind == "image":  # prefill_cost of the image's real counts derives the same static layout
        ref = flops.prefill_cost(cfg, spec, text_tokens=text, images=1, crops=int(p.visual.layout.crops.max()),
                                 image_tokens=span_tokens)
        if not math.isclose(ref.total, cost.total, rel_tol=1e-9) or ref.segments != cost.segments:
            raise AssertionError(f"prefill_flops {cost} != flops.prefill_cost {ref}")
    return out


def measure_row(model, progs, p, repeats: int, baseline=None) -> dict:
    """Prefill (ABBA-paired with ``baseline`` when given), decode fit, KV bytes, segment lengths, compile s."""
    comp = T.compile_seconds(progs.prefill, model.params, p.arrays, static=p.static, max_new_tokens=NEW + 1)

    def run():
        return progs.prefill(model.params, p.arrays, static=p.static, max_new_tokens=NEW + 1)

    def prefill():
        return jax.block_until_ready(run().first_logits)

    state = run()
    lengths = T.decode_lengths(NEW)
    fns = {"prefill": prefill}
    if baseline is not None:
        fns["full"] = baseline
    fns.update({n: (lambda n=n: jax.block_until_ready(progs.decode(model.params, state, max_new_tokens=n,
                                                                   eos_ids=(), pad_id=0))) for n in lengths})
    res = T.interleaved(fns, max(repeats, 3))
    fit = T.fit_decode({n: res[n].samples for n in lengths})
    caps = [c.capacity - (NEW + 1) for c in state.caches]
    out = {"prefill": res["prefill"].to_dict(), "prefill_s": res["prefill"].median,
           "prefill_first_s": res["prefill"].first_s, "prefill_compile_s": comp["compile_s"],
           "prefill_lower_s": comp["lower_s"], "xla": T.xla_analysis(comp["compiled"]), "decode_fit": fit.to_dict(),
           "decode_s_per_tok": fit.per_token_s, "kv_bytes": int(state.kv_bytes), "llm_seq_first": caps[0],
           "llm_seq": caps[-1], "valid_last": int(np.asarray(state.key_valid[-1])[0, : caps[-1]].sum())}
    if baseline is not None:
        sp = res.ratio("full", "prefill")
        out.update(speedup=sp.median, speedup_stats=sp.to_dict(), full_prefill_paired_s=res["full"].median)
    out["run"] = prefill
    return out


def plan_row(model, row: Row, inputs: dict):
    """``(spec, plan)`` of a row: the spec as ``jaxprune-eval --reducer NAME:BUDGET`` builds it."""
    spec = None if row.name == "full" else registry.make(row.name, row.budget, model.cfg)
    return spec, model.plan(inputs["input_ids"], inputs.get("pixel_values"), None, inputs.get("image_sizes"), spec,
                            pixel_values_videos=inputs.get("pixel_values_videos"))


def table_row(r: dict, base: dict) -> list:
    """The markdown cells of a measured row (``base``: the full row of its kind)."""
    pre = T.Stats(**r["prefill"]["stats"])
    sp = T.Stats(**r["speedup_stats"]) if "speedup_stats" in r else None
    fit = T.Fit(**{k: v for k, v in r["decode_fit"].items() if k != "per_token_s"})
    seq = f"{r['llm_seq_first']} / {r['llm_seq']}" if r["llm_seq_first"] != r["llm_seq"] else str(r["llm_seq"])
    return [r["kind"], r["reducer"], r["budget"], seq, r["visual_valid_last"], pre.fmt(),
            "1.00" if sp is None else f"{sp.median:.2f} [{sp.min:.2f}-{sp.max:.2f}]",
            f"{base['flops_total'] / r['flops_total']:.2f} ({r['flops_total'] / 1e9:.3g} GF)", T.fmt_fit(fit),
            f"{r['kv_bytes'] / 2**20:.2f}", f"{base['kv_bytes'] / r['kv_bytes']:.2f}x", f"{r['prefill_compile_s']:.1f}"]


def describe(cfg: LlavaConfig, counts: dict) -> str:
    """One line: tower, pinpoints, cap, decoder."""
    v, t = cfg.vision, cfg.text
    pins = check_pinpoints(cfg.image_grid_pinpoints, v.image_size)
    return (f"SigLIP {v.num_hidden_layers}x{v.hidden_size} ({v.num_attention_heads} heads, inter "
            f"{v.intermediate_size}; {v.image_size} px, patch {v.patch_size}: {counts['patches_per_crop']} tokens per "
            f"crop, no CLS), {len(pins)} pinpoints (at most {max_crops(pins, v.image_size)} crops), "
            f"{cfg.vision_aspect_ratio}; Qwen2 {t.num_hidden_layers}x{t.hidden_size} ({t.num_attention_heads} query / "
            f"{t.num_key_value_heads} KV heads of {t.head_dim}, q/k/v biases, inter {t.intermediate_size}, vocab "
            f"{t.vocab_size}); random weights, fp32")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="a tiny config (tests); writes nothing without --out")
    ap.add_argument("--dry-run", action="store_true",
                    help="plan every row, print token counts / LLM lengths / FLOPs; no compile, no timing")
    ap.add_argument("--image-reducers", nargs="*", default=list(IMAGE_REDUCERS))
    ap.add_argument("--video-reducers", nargs="*", default=list(VIDEO_REDUCERS))
    ap.add_argument("--image-fractions", nargs="*", type=int, default=None,
                    help="budgets = image tokens / F for each F (default 4 9; --tiny: 4)")
    ap.add_argument("--video-fractions", nargs="*", type=int, default=list(VIDEO_FRACTIONS))
    ap.add_argument("--out", default=None, help="results stem under experiments/results (default onevision_cpu)")
    ap.add_argument("--note", action="append", default=[], help="a paragraph for the results file (repeatable)")
    T.add_cli(ap)
    a = ap.parse_args(argv)
    cfg = onevision_config(a.tiny)
    counts = token_counts(cfg, TINY["hw"] if a.tiny else IMAGE_HW, TINY["frames"] if a.tiny else FRAMES)
    fracs = a.image_fractions or list(TINY["image_fractions"] if a.tiny else IMAGE_FRACTIONS)
    rows = rows_for(counts, a.image_reducers, a.video_reducers, fracs, a.video_fractions)
    model = jp.Llava.random(cfg, seed=0)
    inputs = {k: make_inputs(cfg, k, counts) for k in ("image", "video")}
    cmd = "python -m experiments.bench_onevision " + " ".join(T.shorten_notes(sys.argv[1:] if argv is None else argv))
    if a.dry_run:
        return dry_run(model, rows, inputs, counts)
    quiet = T.quiet_from_cli(a)
    data = {"device": jax_device(), "git": git_rev(), "batch": 1, "repeats": a.repeats, "command": cmd,
            "config": cfg.to_hf_dict(), "tokens": counts, "new_tokens": NEW, "prefix": PREFIX, "question": QUESTION,
            "quiet": quiet, "runs": []}
    table, base, base_progs = [], {}, None
    with T.LoadMonitor() as lm:
        for row in rows:
            t0 = time.perf_counter()
            try:
                spec, p = plan_row(model, row, inputs[row.kind])
                if row.name == "full":  # the pairing baseline runs from programs of its own (survives clear_cache)
                    for b in base.values():  # the previous kind's baseline is done: release its programs
                        b.pop("run", None)
                    base_progs = engine.Programs(model.graphdef)
                progs = base_progs if row.name == "full" else model.programs
                fl = row_flops(model, p, spec, row.kind, counts[f"{row.kind}_tokens"])
                r = measure_row(model, progs, p, a.repeats, None if row.name == "full" else base[row.kind]["run"])
            except Exception as e:  # noqa: BLE001 - a row that cannot run is reported, not fatal
                table.append([row.kind, row.name, row.budget, "error", str(e)[:80]] + [""] * 7)
                data["runs"].append({"kind": row.kind, "reducer": row.name, "budget": row.budget,
                                     "error": f"{type(e).__name__}: {e}"})
                print(table[-1], flush=True)
                continue
            finally:
                model.programs.clear_cache()  # one row's programs at a time (bench_budgets.release_programs)
            run = r.pop("run")
            r = dict(kind=row.kind, reducer=row.name, budget=row.budget, spec=repr(spec),
                     wall_s=time.perf_counter() - t0, **fl, **r)
            r["visual_valid_last"] = r["valid_last"] - PREFIX - QUESTION
            r["kv_agree"] = r["kv_bytes"] == r["kv_bytes_analytic"]
            if row.name == "full":
                base[row.kind] = dict(r, run=run)
            r["flops_limit"] = base[row.kind]["flops_total"] / r["flops_total"]
            if "speedup" in r:  # > 1: realized beyond the FLOPs limit (see the FLOPs line of the results file)
                r["speedup_over_limit"] = r["speedup"] / r["flops_limit"]
            data["runs"].append(r)
            table.append(table_row(r, base[row.kind]))
            print(table[-1], flush=True)
    data["load"], data["env"] = lm.stop(), T.environment()
    data["machine"] = T.describe_machine(data["env"])
    md = markdown(cfg, counts, data, table, quiet, cmd, a)
    stem = a.out or (None if a.tiny else "onevision_cpu")
    if stem:
        write_results(stem, md, data)
    print(md)
    return data


def markdown(cfg: LlavaConfig, counts: dict, data: dict, table: list, quiet, cmd: str, a) -> str:
    """The results file: config, token counts, method, machine, load, the table."""
    c = counts
    hf = "equal to HF `LlavaOnevisionProcessor._get_number_of_features`" if c["image_tokens_hf"] is not None else \
        "HF's processor not importable: not cross-checked"
    return "\n".join([
        f"# LLaVA-OneVision: TTFT, decode and KV cache at the real token counts, full vs reduced (CPU, fp32)", "",
        *T.header_lines(data["env"], data["load"], quiet),
        f"- jax device: {data['device']}; git {data['git']}; batch 1; command: `{cmd}`",
        f"- config: OneVision geometry at reduced width: {describe(cfg, c)}; {PREFIX}-token prefix + the "
        f"placeholders + {QUESTION}-token question",
        f"- tokens: image {c['image_hw'][0]}x{c['image_hw'][1]} (h x w) -> anyres grid {c['grid'][0]}x{c['grid'][1]} "
        f"+ base = {c['crops']} crops -> {c['image_tokens']} placeholders (base {c['patches_per_crop']} + unpadded, "
        f"capped tile grid with a newline per row; {hf}); video {c['frames']} frames x {c['pooled_side']}^2 pooled + "
        f"1 newline = {c['video_tokens']}; a reduced image row's static span = the bucketed real span (`onevision_spans."
        f"ladder`: >= {c['image_tokens']}, at most the config's largest image span, {c['max_image_tokens']} slots)",
        "- budget = the span's tokens reaching the LLM (newlines count), `registry.make(name, budget, cfg)` as "
        "`jaxprune-eval --reducer NAME:BUDGET`: fastervlm / consensusdrop keep `budget` slots of the span by the "
        "CLS-free saliency surrogate (attention each patch receives in its crop; consensusdrop fuses it with layer-2 "
        "text->image attention from a shallow pass over the full static span); fastv keeps `budget` after layer 2, "
        "the first two layers running the full static span; visionzip splits `budget` over the span's crop slots "
        "(image: the bucketed crop count of the batch, every slot run through the tower, the absent ones invalid, so "
        "an image with fewer crops than its bucket delivers crops * (budget // slots) tokens: see 'visual valid'; "
        "video: per frame)",
        "- columns: LLM seq = decoder sequence of the first / last segment (bucket padding and invalid span slots "
        "included); visual valid = valid visual tokens in the last segment (the caches' key mask minus the "
        f"{PREFIX + QUESTION} text tokens)",
        ("- method (`experiments/timing.py`): TTFT = jitted prefill to first-token logits incl. the tower on every "
         f"crop / frame, median [min-max] ms of {max(a.repeats, 3)} ABBA rounds after a warm-up; speedup = median "
         "[min-max] of the per-round ratios t_full / t, the full prefill of the same input timed in the same rounds; "
         f"decode = slope of a least-squares fit of the decode loop's time at {T.decode_lengths(NEW)} tokens on one "
         "prefill state (ms/token, + intercept ms, residual rms ms), refused if not positive / not growing; KV = "
         f"bytes of the static caches (prompt + {NEW + 1} slots; equal to `flops.kv_cache_bytes` of the FLOPs' "
         f"segments: {all(r.get('kv_agree', True) for r in data['runs'])}); compile = lower + compile of the prefill, "
         "timed apart"),
        ("- FLOPs limit = FLOPs_full / FLOPs_row with `jaxprune.flops`' counts (SwiGLU decoder with GQA widths, LM "
         "head on the last token, the tower on every crop slot the program computes incl. the bucket's padding crop, "
         "projector on every patch, in-LLM cut selection, ConsensusDrop's shallow pass); attention is counted as the "
         "full T x T square (the CPU causal flash schedule computes about half of it, which lowers the full row's time "
         "against its count); a realized speedup above the limit would mean the full row ran a slower kernel per "
         "FLOP than the reduced one (long causal attention: `experiments/results/gpu_cpu_reduced.md`), one below "
         "it that the unreduced parts (tower, first layers) run slower per FLOP than the pruned decoder"),
        "- the machine may be shared: absolute times carry its load (see the load line); the paired speedups are the "
        "robust figures",
        *[f"\n{n}" for n in a.note],
        "", md_table(["kind", "reducer", "budget (span tokens)", "LLM seq (first / last)", "visual valid",
                      "TTFT ms", "TTFT speedup (paired)", "FLOPs limit (GFLOPs)", "decode ms/tok", "KV MiB",
                      "KV reduction", "prefill compile s"], table), ""])


def dry_run(model, rows: list[Row], inputs: dict, counts: dict) -> dict:
    """Plan every row and print its shapes and FLOPs (no compile, no timing): the full-size config's check."""
    out = {"tokens": counts, "rows": []}
    print(counts, flush=True)
    base = {}
    for row in rows:
        spec, p = plan_row(model, row, inputs[row.kind])
        fl = row_flops(model, p, spec, row.kind, counts[f"{row.kind}_tokens"])
        lay = p.static.layout
        if row.name == "full":
            base[row.kind] = fl["flops_total"]
        info = {"kind": row.kind, "reducer": row.name, "budget": row.budget, "batch_shape": list(p.batch_shape),
                "crops_run": lay.crops if getattr(lay, "vision", False) else lay.Tc,
                "span_slots": getattr(lay, "S", 0) or None, "span_full_slots": getattr(lay, "S_full", 0) or None,
                "flops_limit": base[row.kind] / fl["flops_total"],
                **fl}
        out["rows"].append(info)
        print(f"{row.kind:5s} {row.name:13s} {row.budget:5d}  input {p.batch_shape}  crops run {info['crops_run']:3d}"
              f"  span S_full {info['span_full_slots'] or '-':>5}  segments {fl['segments']}"
              f"  GFLOPs {fl['flops_total'] / 1e9:8.4g}  limit {info['flops_limit']:5.2f}"
              f" (vision {fl['flops_vision'] / 1e9:.1f}, shallow {fl['flops_shallow'] / 1e9:.1f})"
              f"  KV MiB {fl['kv_bytes_analytic'] / 2**20:.1f}", flush=True)
    return out


if __name__ == "__main__":
    main()
