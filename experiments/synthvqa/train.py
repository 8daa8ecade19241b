"""Train the tiny synthetic-VQA LLaVA from scratch on CPU (JAX + optax), export it as an HF checkpoint.

``python -m experiments.synthvqa.train --out jaxprune/eval/synthvqa/checkpoint`` (reproducible from ``--seed``).

Model (:data:`MODEL_CFG`): a CLIP-style ViT (96 px, 8 px patches -> 12x12 = 144 tokens, width 64, 3 layers of
which LLaVA's ``vision_feature_layer=-2`` runs 2), LLaVA's 2-layer GELU projector, and a 4-layer Llama
(width 128, 4 query / 2 KV heads, SwiGLU 256) over a word-level vocabulary of 128 (``<image>`` = 127).

Training design (what was tried and why is in ``experiments/results/synthvqa_training.md``):

1. **Tower pretraining** (``tower_steps``): the ViT alone, with auxiliary heads on its feature-layer output:
   per patch, the colour and the shape of the object covering it (or background), whether it holds an
   object's centre and which 3x3 cell it lies in; on the CLS token, which (colour, shape) pairs are in the image (multi-label). A
   from-scratch LM cannot discover small objects through a randomly initialised tower in a CPU budget;
   the per-patch targets make every patch feature say what is under it. The CLS target makes CLS attend to
   the objects, which is what CLS-attention reducers (FasterVLM, VisionZip, AdaFV, ...) rely on in real CLIP.
2. **LLaVA training** (``steps``): everything end to end on the question/answer pairs with the vicuna_v1
   template exactly as evaluation prompts it, several questions of an image per conversation
   (``multi_turn``); loss on the answer tokens and ``</s>``, plus ``question_weight`` x the next-token loss
   of the question text after the image (image-conditioned question modelling: predicting "circle" in
   "What color is the circle" needs the shapes present, a one-hop retrieval that bootstraps the two-hop
   circuits the answers need); the auxiliary tower loss is kept at ``aux_weight`` so features stay local.

Issue #16 recipe options (all off by default, so the command above still trains the shipped v9 recipe):

3. ``--scene-style large``: objects of 3x3 / 4x4 patches on a textured background (spatial redundancy);
4. ``--caption-steps N``: caption alignment after the tower stage (LLaVA stage 1, :mod:`.captions`): image ->
   "a red circle in the top left . ..." with only ``--caption-train`` groups moving (default the projector);
5. ``--aug-prob p``: training-time visual-token reduction (:mod:`.augment`): random subsets down to
   ``--aug-min-keep`` tokens, dropped (renumbered or kept positions) or merged into their nearest kept patch;
   ``--val-reduced k`` also logs teacher-forced validation with every row reduced to ``k`` random tokens.

v11 options (off by default): ``--aug-object-bias p`` (object-biased reduction draws, either sign),
``--aug-evidence every_object`` (no answer loss when any asked object lost all its tokens), ``--attn-every-word true``
(attention targets on the second answer word's row too); v12: ``--aug-bias-per object`` (the object bias drawn per
object, not once per row). The shipped chain: :mod:`experiments.synthvqa.recipe`.

Training runs with the one-pass CPU attention schedule (:func:`differentiable_cpu_attention`).

The heads are training-only and not exported. The export is the HF LLaVA-1.5 layout (``legacy`` keys) with
a ``tokenizer.json``; :func:`jaxprune.checkpoints.convert` loads it back like any checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxprune as jp
from jaxprune.eval.synthvqa.dataset import make_items, render_items
from jaxprune.eval.synthvqa.questions import QTYPES, vocabulary
from jaxprune.eval.synthvqa.scene import COLOUR_NAMES, SHAPES
from experiments.synthvqa.augment import ReductionAug, augment_batch, mix_tokens, random_keep, reduce_rows
from experiments.synthvqa.align import word_patch_loss, word_labels
from experiments.synthvqa.captions import caption_loss, caption_pool
from experiments.train.batches import collate, encode
from experiments.train.loss import llava_logits, sequence_hits, token_xent, vision_hidden
from jaxprune.eval.wordtok import save_word_tokenizer, word_tokenizer
from jaxprune.engine import decoder as gen
from jaxprune.config import LlavaConfig, TextConfig, VisionConfig
from jaxprune.processing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, IMAGE_TOKEN

MODEL_CFG = LlavaConfig(
    vision=VisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                        image_size=96, patch_size=8),
    text=TextConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=32, eos_token_id=(2,), pad_token_id=0,
                    max_position_embeddings=1024),
    image_token_index=127)
N_VISUAL = (MODEL_CFG.vision.image_size // MODEL_CFG.vision.patch_size) ** 2  # 144
SYSTEM_WORDS = ("a chat between curious user and an artificial intelligence assistant . the gives helpful , "
                "detailed polite answers to ' s questions :").split()


def tokenizer():
    """The HF fast tokenizer of the model (word level: the vicuna_v1 system prompt + the synthvqa words)."""
    from transformers import PreTrainedTokenizerFast

    tok = word_tokenizer(SYSTEM_WORDS + list(vocabulary()), MODEL_CFG.text.vocab_size,
                         MODEL_CFG.image_token_index)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    n_train_images: int = 12000
    tower_steps: int = 500
    tower_batch: int = 64
    tower_lr: float = 3e-3
    steps: int = 1500
    batch: int = 32
    lr: float = 1.5e-3
    warmup: int = 100
    weight_decay: float = 0.01
    aux_weight: float = 0.3
    question_weight: float = 0.5
    #: supervised attention (two hops), weight ``attn_weight`` (0 = off): the head-mean attention of each
    #: answer's query row is pulled onto the question's colour / shape words in the layers before
    #: ``attn_layer`` (their last layer) and onto the patches the question is about in ``attn_layer``
    #: (``-log`` of the attention mass).
    attn_layer: int = 1
    attn_weight: float = 1.0
    #: scene curriculum: comma-separated ``min-max:steps`` phases of easier scenes (objects per image) run
    #: first, then the benchmark's 3-5 objects for the remaining steps; "" = none.
    curriculum: str = ""
    #: continue from this HF checkpoint (e.g. the shipped one) instead of random weights; set tower_steps=0
    #: to keep its tower.
    init: str = ""
    eval_every: int = 100
    multi_turn: bool = True
    #: stage 2 trains the projector and the LM on precomputed features of the stage-1 tower (as LLaVA keeps
    #: CLIP frozen); False = end to end with the auxiliary loss kept at ``aux_weight``.
    freeze_tower: bool = True
    n_val_images: int = 128
    # ---- issue #16 recipe options (defaults = the shipped v9 recipe) -----------------------------------------
    #: scene style of the training / validation images (:data:`jaxprune.eval.synthvqa.scene.STYLES`)
    scene_style: str = "grid"
    #: caption alignment (LLaVA stage 1) after the tower stage: steps, lr, batch, trained groups (comma-separated
    #: of ``projector``, ``language``, ``lm_head``); needs ``freeze_tower``
    caption_steps: int = 0
    caption_lr: float = 2e-3
    caption_batch: int = 32
    caption_train: str = "projector"
    #: training-time visual-token reduction (:mod:`experiments.synthvqa.augment`); aug_prob=0: off
    aug_prob: float = 0.0
    aug_min_keep: int = 8
    aug_merge: float = 0.3
    aug_keep_positions: float = 0.3
    #: also report teacher-forced validation with every row reduced to this many random tokens (0: off)
    val_reduced: int = 0
    #: weight of the word-to-patch alignment term (:mod:`experiments.synthvqa.align`) in the caption and the LLaVA
    #: stages (frozen tower only); 0 = off
    align_weight: float = 0.0
    # ---- v11 options (defaults = the v10 recipe) ------------------------------------------------------------------
    #: share of the reduced rows drawn object-biased (:mod:`experiments.synthvqa.augment`: decouples the kept share
    #: of object tokens from the count) and the answer-masking rule under reduction ("any" / "every_object")
    aug_object_bias: float = 0.0
    aug_evidence: str = "any"
    #: supervised attention also on the query row of every further answer word (the second word of "top left"),
    #: not only on the row before the first one
    attn_every_word: bool = False
    # ---- v12 option ------------------------------------------------------------------------------------------------
    #: the object bias drawn once per row ("all", v11) or per object ("object": a colour's kept share varies for a
    #: fixed count; :mod:`experiments.synthvqa.augment`)
    aug_bias_per: str = "all"


def normalize(images: np.ndarray) -> np.ndarray:
    """``[N, S, S, 3] uint8 -> [N, 3, S, S] float32``: LLaVA 'pad' preprocessing of an already square image
    at the tower's size (rescale 1/255, CLIP mean/std); equality with
    :func:`jaxprune.processing.preprocess_images` is tested."""
    x = images.astype(np.float32) * np.float32(1 / 255)
    x = (x - np.asarray(OPENAI_CLIP_MEAN, np.float32)) / np.asarray(OPENAI_CLIP_STD, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


# ---- data -----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Pool:
    images: np.ndarray        # [N, S, S, 3] uint8
    colour: np.ndarray        # [N, P] int32
    shape: np.ndarray         # [N, P] int32
    centre: np.ndarray        # [N, P] int32
    pairs: np.ndarray         # [N, C*S] float32 multi-hot
    q_image: np.ndarray       # [Q] image index of each question
    q_type: np.ndarray        # [Q] index into QTYPES
    ids: np.ndarray           # [Q, T] int32
    labels: np.ndarray        # [Q, T] int32
    valid: np.ndarray         # [Q, T] bool
    qlabels: np.ndarray       # [Q, T] int32: next-token targets of the text after the image that is not an answer
    arow: np.ndarray | None = None     # [Q, 4] query row (the token before each answer), 0 = none
    atarget: np.ndarray | None = None  # [Q, 4, P] float32: patches the answer is about (all zero = none)
    wtarget: np.ndarray | None = None  # [Q, 4, T] float32: the question's colour / shape words
    arow2: np.ndarray | None = None    # [Q, 4] query row of each answer's second word (0 = one-word answer)
    feats: np.ndarray | None = None  # [N, P, Dv] frozen-tower features (freeze_tower)


def build_pool(split: str, seed: int, n_images: int, tok, length: int | None = None,
               multi_turn: bool = False, objects: tuple[int, int] = (3, 5), style: str = "grid") -> Pool:
    """Rendered images + encoded questions. ``multi_turn``: one conversation per image holding all its
    questions in a random order (the first turn is exactly the evaluation prompt); else one row per question.
    ``style``: the scene style (:data:`jaxprune.eval.synthvqa.scene.STYLES`)."""
    items = make_items(split, seed, n_images, objects=objects, style=style)
    rs = render_items(items)
    n = len(items)
    pairs = np.zeros((n, len(COLOUR_NAMES) * len(SHAPES)), np.float32)
    rows, q_image, q_type, cache, targets = [], [], [], {}, []
    order_rng = np.random.default_rng([seed, 99])
    for i, it in enumerate(items):
        for o in it.scene.objects:
            pairs[i, COLOUR_NAMES.index(o.colour) * len(SHAPES) + SHAPES.index(o.shape)] = 1
        if multi_turn:
            qas = [it.qas[j] for j in order_rng.permutation(len(it.qas))]
            turns = [((IMAGE_TOKEN + "\n" if j == 0 else "") + qa.text, qa.answer) for j, qa in enumerate(qas)]
            rows.append(encode(tok, turns, MODEL_CFG.image_token_index, N_VISUAL))
            targets.append([target_patches(qa, rs.colour_map[i], rs.shape_map[i]) for qa in qas])
            q_image.append(i)
            q_type.append(-1)
            continue
        for qa in it.qas:
            key = (qa.text, qa.answer)
            if key not in cache:
                cache[key] = encode(tok, [(IMAGE_TOKEN + "\n" + qa.text, qa.answer)], MODEL_CFG.image_token_index,
                                    N_VISUAL)
            rows.append(cache[key])
            q_image.append(i)
            q_type.append(QTYPES.index(qa.qtype))
            targets.append([target_patches(qa, rs.colour_map[i], rs.shape_map[i])])
    b = collate(rows, bucket=8, length=length)
    arow = np.zeros((len(rows), 4), np.int32)
    arow2 = np.zeros((len(rows), 4), np.int32)
    eos = set(MODEL_CFG.text.eos_token_id)
    atarget = np.zeros((len(rows), 4, N_VISUAL), np.float32)
    wtarget = np.zeros((len(rows), 4, b.input_ids.shape[1]), np.float32)
    content = np.isin(b.input_ids, [tok.convert_tokens_to_ids(w) for w in COLOUR_NAMES + SHAPES])
    for r, tg in enumerate(targets):
        lab = b.labels[r]
        starts = np.flatnonzero((lab >= 0) & np.concatenate([[True], lab[:-1] < 0]))  # first token of each answer
        prev = 0
        for j, t in enumerate(tg[:4]):
            arow[r, j] = starts[j]
            nxt = starts[j] + 1
            if nxt < len(lab) and lab[nxt] >= 0 and int(lab[nxt]) not in eos:  # a second answer word
                if nxt + 1 < len(lab) and lab[nxt + 1] >= 0 and int(lab[nxt + 1]) not in eos:
                    raise ValueError("answers of more than two words are not supported by the attention targets")
                arow2[r, j] = nxt
            atarget[r, j] = t
            wtarget[r, j, prev:starts[j] + 1] = content[r, prev:starts[j] + 1]
            prev = starts[j] + 1
    return Pool(rs.images, rs.colour_map.reshape(n, -1).astype(np.int32), rs.shape_map.reshape(n, -1).astype(np.int32),
                rs.centre_map.reshape(n, -1).astype(np.int32), pairs, np.asarray(q_image), np.asarray(q_type),
                b.input_ids, b.labels, b.valid, question_labels(b.input_ids, b.labels, b.valid), arow, atarget, wtarget,
                arow2=arow2)


def target_patches(qa, colour_map: np.ndarray, shape_map: np.ndarray) -> np.ndarray:
    """``[P]`` float32: the patches a question is about (the object asked for; every object of the colour for
    "how many"; none for an "is there" whose answer is no)."""
    words = qa.question.lower().rstrip("?").split()
    c = next((COLOUR_NAMES.index(w) + 1 for w in words if w in COLOUR_NAMES), None)
    sh = next((SHAPES.index(w) + 1 for w in words if w in SHAPES), None)
    if qa.qtype == "exist" and qa.answer == "no":
        return np.zeros(N_VISUAL, np.float32)
    m = np.ones(colour_map.shape, bool)
    if c is not None:
        m &= colour_map == c
    if sh is not None:
        m &= shape_map == sh
    return m.reshape(-1).astype(np.float32)


def question_labels(ids: np.ndarray, labels: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """``[Q, T]`` next-token targets for every text token after the last image token that is not an answer
    target (the questions, their suffix and the template words), -1 elsewhere."""
    t = ids.shape[1]
    last_img = t - 1 - np.argmax((ids == MODEL_CFG.image_token_index)[:, ::-1], axis=1)  # [Q]
    pos = np.arange(t)[None, :]
    nxt_valid = np.concatenate([valid[:, 1:], np.zeros_like(valid[:, :1])], axis=1)
    keep = (pos >= last_img[:, None]) & nxt_valid & (labels < 0)
    nxt = np.concatenate([ids[:, 1:], np.zeros_like(ids[:, :1])], axis=1)
    return np.where(keep, nxt, -1).astype(np.int32)


# ---- auxiliary heads ------------------------------------------------------------------------------------
def init_heads(key: jax.Array, dim: int) -> dict:
    sizes = {"colour": 1 + len(COLOUR_NAMES), "shape": 1 + len(SHAPES), "centre": 2, "cell": 9,
             "pairs": len(COLOUR_NAMES) * len(SHAPES)}
    keys = jax.random.split(key, len(sizes))
    return {k: {"w": jax.random.normal(kk, (dim, n)) / dim ** 0.5, "b": jnp.zeros((n,))}
            for kk, (k, n) in zip(keys, sizes.items())}


_G = MODEL_CFG.vision.image_size // MODEL_CFG.vision.patch_size
#: [P] the 3x3 cell (row-major) of each patch, a per-patch auxiliary target (coarse position).
_PATCH_CELL = jnp.asarray((np.arange(_G)[:, None] * 3 // _G * 3 + np.arange(_G)[None, :] * 3 // _G).reshape(-1))


def aux_loss(heads: dict, hidden: jax.Array, colour, shape, centre, pairs) -> tuple[jax.Array, dict]:
    """``hidden [B, 1+P, Dv]`` (feature layer, CLS first); labels ``[B, P]`` ints, ``pairs [B, C*S]``."""
    def ce(name, x, y):
        lg = x @ heads[name]["w"] + heads[name]["b"]
        return -jnp.take_along_axis(jax.nn.log_softmax(lg), y[..., None], -1).mean(), (lg.argmax(-1) == y).mean()

    patches, cls = hidden[:, 1:], hidden[:, 0]
    lc, ac = ce("colour", patches, colour)
    ls, as_ = ce("shape", patches, shape)
    lz, _ = ce("centre", patches, centre)
    lcell, acell = ce("cell", patches, jnp.broadcast_to(_PATCH_CELL, colour.shape))
    lg = cls @ heads["pairs"]["w"] + heads["pairs"]["b"]
    lp = optax.sigmoid_binary_cross_entropy(lg, pairs).mean()
    ap = ((lg > 0) == (pairs > 0.5)).all(-1).mean()
    return lc + ls + 0.5 * lz + 0.5 * lcell + lp, {"aux_colour_acc": ac, "aux_shape_acc": as_, "aux_pairs_exact": ap,
                                                   "aux_cell_acc": acell}


# ---- steps ----------------------------------------------------------------------------------------------
def _optimizer(lr: float, steps: int, warmup: int, wd: float):
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), lr * 0.05)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=wd))


def make_steps(graphdef, cfg: TrainConfig, tower_opt, opt):
    def tower_loss(train, batch):
        params, heads = train
        m = nnx.merge(graphdef, params)
        hid = vision_hidden(m, batch["pixels"])
        return aux_loss(heads, hid, batch["colour"], batch["shape"], batch["centre"], batch["pairs"])

    def full_loss(train, batch):
        params, heads = train
        m = nnx.merge(graphdef, params)
        hid = vision_hidden(m, batch["pixels"])
        la, metrics = aux_loss(heads, hid, batch["colour"], batch["shape"], batch["centre"], batch["pairs"])
        logits = llava_logits(m, batch["ids"], batch["pixels"], batch["valid"], batch["positions"], hidden=hid)
        lt, _, _ = token_xent(logits, batch["labels"])
        lq, _, _ = token_xent(logits, batch["qlabels"])
        metrics = dict(metrics, answer_loss=lt, question_loss=lq,
                       answer_exact=sequence_hits(logits, batch["labels"]).mean())
        return lt + cfg.question_weight * lq + cfg.aux_weight * la, metrics

    def tower_step(params, heads, state, batch):
        # Only the vision tower and the heads move in stage 1.
        vis = params["vision"]

        def f(tr):
            p = dict(params)
            p["vision"] = tr[0]
            return tower_loss((p, tr[1]), batch)

        (loss, metrics), g = jax.value_and_grad(f, has_aux=True)((vis, heads))
        upd, state = tower_opt.update(g, state, (vis, heads))
        vis, heads = optax.apply_updates((vis, heads), upd)
        params = dict(params)
        params["vision"] = vis
        return params, heads, state, dict(metrics, loss=loss)

    def full_step(params, heads, state, batch):
        (loss, metrics), g = jax.value_and_grad(full_loss, has_aux=True)((params, heads), batch)
        upd, state = opt.update(g, state, (params, heads))
        params, heads = optax.apply_updates((params, heads), upd)
        return params, heads, state, dict(metrics, loss=loss)

    def frozen_loss(train, vision, batch):
        m = nnx.merge(graphdef, dict(train, vision=vision))
        vis = m.projector(batch["feats"])  # [B, P, H]
        la_align = _align_term(m, vis, batch) if cfg.align_weight else jnp.zeros(())
        if "mix" in batch:  # training-time reduction: merged tokens (dropped slots are invalid in batch["valid"])
            vis = mix_tokens(batch["mix"], vis)
        emb = m.merge(batch["ids"], vis)
        la_, pos, val = cfg.attn_layer, batch["positions"], batch["valid"]
        h, _, (q0, k0) = gen.decoder_prefill(m, emb, pos, val, range(la_), 0, return_qk=True)
        h, _, (q, k) = gen.decoder_prefill(m, h, pos, val, range(la_, la_ + 1), 0, return_qk=True)
        h, _ = gen.decoder_prefill(m, h, pos, val, range(la_ + 1, len(m.language.layers)), 0)
        logits = m.logits(h)
        lt, _, _ = token_xent(logits, batch["labels"])
        lq, _, _ = token_xent(logits, batch["qlabels"])
        img = jnp.argmax(batch["ids"] == MODEL_CFG.image_token_index, axis=1)[:, None] + jnp.arange(N_VISUAL)
        full = jnp.zeros(batch["wtarget"].shape, jnp.float32)
        full = jax.vmap(lambda f, sl, t: f.at[:, sl].set(t))(full, img, batch["atarget"])  # [B, R, T]
        lat = attention_target_loss(q, k, val, batch["arow"], full)
        lat = lat + attention_target_loss(q0, k0, val, batch["arow"], batch["wtarget"])
        if cfg.attn_every_word:  # the second word's row reads the same patches and question words
            two = (batch["arow2"] > 0)[:, :, None]  # [B, R, 1]
            lat = lat + attention_target_loss(q, k, val, batch["arow2"], full * two)
            lat = lat + attention_target_loss(q0, k0, val, batch["arow2"], batch["wtarget"] * two)
        metrics = dict(answer_loss=lt, question_loss=lq, attn_loss=lat, align_loss=la_align,
                       answer_exact=sequence_hits(logits, batch["labels"]).mean())
        return lt + cfg.question_weight * lq + cfg.attn_weight * lat + cfg.align_weight * la_align, metrics

    def frozen_step(train, vision, state, batch):
        (loss, metrics), g = jax.value_and_grad(frozen_loss, has_aux=True)(train, vision, batch)
        upd, state = opt.update(g, state, train)
        return optax.apply_updates(train, upd), state, dict(metrics, loss=loss)

    def evaluate(params, batch):
        m = nnx.merge(graphdef, params)
        logits = llava_logits(m, batch["ids"], batch["pixels"], batch["valid"], batch["positions"])
        return sequence_hits(logits, batch["labels"])

    return (jax.jit(tower_step, donate_argnums=(0, 1, 2)), jax.jit(full_step, donate_argnums=(0, 1, 2)),
            jax.jit(frozen_step, donate_argnums=(0, 2)), jax.jit(evaluate))


def evaluate_features(graphdef, params: dict, batch: dict) -> jax.Array:
    """``[B]`` teacher-forced exact match on frozen-tower features with an (optional) reduction: ``feats``,
    ``mix``, ``ids``, ``valid``, ``positions``, ``labels``."""
    m = nnx.merge(graphdef, params)
    vis = mix_tokens(batch["mix"], m.projector(batch["feats"])) if "mix" in batch else m.projector(batch["feats"])
    logits = gen.full_logits(m, m.merge(batch["ids"], vis), batch["positions"], batch["valid"])
    return sequence_hits(logits, batch["labels"])


def _align_term(m, vis: jax.Array, batch: dict) -> jax.Array:
    """Word-to-patch alignment of projected tokens ``vis [B, P, H]`` (unreduced) with the LLM input embeddings of
    the colour and shape words, labels from the batch's per-patch ``pcolour`` / ``pshape`` ``[B, P]``."""
    emb = m.embed_text(jnp.asarray(align_word_ids())[None])[0]  # [W, H]
    return word_patch_loss(vis, emb, word_labels(batch["pcolour"], batch["pshape"], len(COLOUR_NAMES), len(SHAPES)))


@functools.cache
def align_word_ids() -> np.ndarray:
    """``[W]`` token ids of the 6 colour words then the 4 shape words (the alignment term's words)."""
    tok = tokenizer()
    return np.asarray([tok.convert_tokens_to_ids(w) for w in COLOUR_NAMES + SHAPES], np.int32)


def make_caption_step(graphdef, groups: tuple[str, ...], opt, align_weight: float = 0.0):
    """Jitted caption step: only the parameter groups ``groups`` move (LLaVA stage 1: ``("projector",)``), plus
    ``align_weight`` x the word-to-patch alignment term when the batch carries ``pcolour`` / ``pshape``."""
    def loss_fn(train, frozen, batch):
        m = nnx.merge(graphdef, {**frozen, **train})
        loss, acc = caption_loss(m, batch["feats"], batch["ids"], batch["labels"], batch["valid"])
        la = _align_term(m, m.projector(batch["feats"]), batch) if align_weight else jnp.zeros(())
        return loss + align_weight * la, (acc, loss, la)

    def step(train, frozen, state, batch):
        (_, (acc, loss, la)), g = jax.value_and_grad(loss_fn, has_aux=True)(train, frozen, batch)
        upd, state = opt.update(g, state, train)
        return optax.apply_updates(train, upd), state, {"caption_loss": loss, "caption_token_acc": acc,
                                                        "align_loss": la}

    return jax.jit(step, donate_argnums=(0, 2))


def parse_groups(spec: str) -> tuple[str, ...]:
    """``"projector,language"`` -> ``("projector", "language")``; groups of the LLaVA parameter tree."""
    known = ("projector", "language", "lm_head")
    out = tuple(dict.fromkeys(g.strip() for g in spec.split(",") if g.strip()))
    bad = [g for g in out if g not in known]
    if not out or bad:
        raise ValueError(f"caption_train={spec!r}: expected comma-separated groups of {known}")
    return out


def attention_target_loss(q: jax.Array, k: jax.Array, valid: jax.Array, arow: jax.Array,
                          target: jax.Array) -> jax.Array:
    """``-log`` of the head-mean attention mass that each answer's query row puts on its target slots (rows
    without a target are ignored). ``q [B,T,N,hd]``, ``k [B,T,K,hd]`` post-RoPE of one layer, ``arow [B, R]``,
    ``target [B, R, T]``."""
    from jaxprune.models.attention import attention_rows

    T = q.shape[1]
    q_rows = jnp.take_along_axis(q, arow[:, :, None, None], axis=1)  # [B, R, N, hd]
    kv = valid[:, None, :] & (jnp.arange(T)[None, None, :] <= arow[:, :, None])  # [B, R, T]
    p = attention_rows(q_rows, k, kv)  # [B, N, R, T]
    mass = (p * target[:, None]).sum(-1).mean(1)  # [B, R]
    has = target.sum(-1) > 0
    return jnp.where(has, -jnp.log(mass + 1e-6), 0.0).sum() / jnp.maximum(has.sum(), 1)


def tower_features(graphdef, params: dict, images: np.ndarray, chunk: int = 256) -> np.ndarray:
    """``[N, P, Dv]`` float32 feature-layer patch features (strategy applied) of uint8 images."""
    f = jax.jit(lambda p, x: nnx.merge(graphdef, p).vision_features(x)[0])
    return np.concatenate([np.asarray(f(params, normalize(images[i:i + chunk])))
                           for i in range(0, len(images), chunk)])


def batch_of(pool: Pool, qidx: np.ndarray) -> dict:
    img = pool.q_image[qidx]
    t = pool.ids.shape[1]
    return {"pixels": normalize(pool.images[img]), "colour": pool.colour[img], "shape": pool.shape[img],
            "centre": pool.centre[img], "pairs": pool.pairs[img], "ids": pool.ids[qidx], "labels": pool.labels[qidx], "qlabels": pool.qlabels[qidx],
            "valid": pool.valid[qidx], "rows": qidx, "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (len(qidx), t))}


def _to_plain(state) -> dict:
    return nnx.to_pure_dict(state)


@contextlib.contextmanager
def differentiable_cpu_attention():
    """The one-pass CPU attention schedule for the whole run: the causal flash schedule that CPU prefills of
    >= ``CPU_BLOCKED_MIN_T`` tokens take since issue #19 loops with dynamic bounds, which reverse-mode autodiff
    refuses (our training rows are 272+ tokens). Results are the same; only the XLA:CPU schedule differs."""
    from jaxprune.models import attention as attn

    old = attn.CPU_BLOCKED_MIN_T
    attn.CPU_BLOCKED_MIN_T = 1 << 30
    try:
        yield
    finally:
        attn.CPU_BLOCKED_MIN_T = old


def train(cfg: TrainConfig, out: Path | None = None, log_path: Path | None = None) -> tuple[jp.Llava, list[dict]]:
    """Run every stage of ``cfg`` (module docstring); export to ``out`` and log to ``log_path`` when given."""
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)  # the log is written from the first eval on
    with differentiable_cpu_attention():
        return _train(cfg, out, log_path)


def _train(cfg: TrainConfig, out: Path | None, log_path: Path | None) -> tuple[jp.Llava, list[dict]]:
    tok = tokenizer()
    t0 = time.time()
    if (cfg.caption_steps or cfg.aug_prob or cfg.val_reduced or cfg.align_weight) and not cfg.freeze_tower:
        raise ValueError("caption_steps / aug_prob / val_reduced / align_weight run on frozen-tower features: set "
                         "freeze_tower")
    aug = ReductionAug(cfg.aug_prob, cfg.aug_min_keep, cfg.aug_merge, cfg.aug_keep_positions,
                       object_bias=cfg.aug_object_bias, evidence=cfg.aug_evidence,
                       bias_per=cfg.aug_bias_per)
    pool = build_pool("train", cfg.seed, cfg.n_train_images, tok, multi_turn=cfg.multi_turn, style=cfg.scene_style)
    phases = parse_curriculum(cfg.curriculum)
    if sum(n for _, n in phases) >= cfg.steps:
        raise ValueError(f"curriculum {cfg.curriculum!r} uses all {cfg.steps} steps")
    cur_pools = [build_pool("train", cfg.seed, min(cfg.n_train_images, n * cfg.batch), tok, length=pool.ids.shape[1],
                            multi_turn=cfg.multi_turn, objects=o, style=cfg.scene_style) for o, n in phases]
    val = build_pool("val", cfg.seed, cfg.n_val_images, tok, style=cfg.scene_style)
    log = [{"event": "data", "seconds": round(time.time() - t0, 1), "train_images": len(pool.images),
            "train_questions": len(pool.ids), "seq_len": int(pool.ids.shape[1])}]
    print(log[-1], flush=True)
    model = jp.Llava.random(MODEL_CFG, seed=cfg.seed) if not cfg.init else _load_init(cfg.init)
    graphdef = model.graphdef
    params = _to_plain(model.params)
    heads = init_heads(jax.random.key(cfg.seed + 1), MODEL_CFG.vision.hidden_size)
    tower_opt = _optimizer(cfg.tower_lr, cfg.tower_steps, cfg.warmup, cfg.weight_decay)
    opt = _optimizer(cfg.lr, cfg.steps, cfg.warmup, cfg.weight_decay)

    tower_step, full_step, frozen_step, evaluate = make_steps(graphdef, cfg, tower_opt, opt)
    rng = np.random.default_rng(cfg.seed)
    n_img = len(pool.images)
    first_q = np.searchsorted(pool.q_image, np.arange(n_img))  # a question row per image, for tower batches
    tstate = tower_opt.init((params["vision"], heads))
    t1 = time.time()
    for step in range(cfg.tower_steps):
        b = batch_of(pool, first_q[rng.integers(0, n_img, cfg.tower_batch)])
        params, heads, tstate, met = tower_step(params, heads, tstate,
                                                {k: b[k] for k in ("pixels", "colour", "shape", "centre", "pairs")})
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.tower_steps:
            log.append({"stage": "tower", "step": step + 1, "seconds": round(time.time() - t1, 1),
                        **{k: round(float(v), 4) for k, v in met.items()}})
            print(log[-1], flush=True)
    del tstate
    if cfg.freeze_tower:
        vision = params["vision"]
        for p_ in [pool] + cur_pools + ([val] if cfg.val_reduced else []):
            p_.feats = tower_features(graphdef, params, p_.images)
        if cfg.caption_steps:
            params = caption_stage(cfg, graphdef, params, pool, tok, log, log_path)
        train_p = {k: v for k, v in params.items() if k != "vision"}
        state = opt.init(train_p)
    else:
        state = opt.init((params, heads))
    vb = batch_of(val, np.arange(len(val.ids)))
    vb = {k: vb[k] for k in ("pixels", "ids", "labels", "valid", "positions")}
    vr = None
    if cfg.val_reduced:  # a fixed random keep-k reduction of every validation row (same draw at every eval)
        red = random_keep(np.random.default_rng([cfg.seed, 7]), len(val.ids), _G, cfg.val_reduced)
        v2, p2 = reduce_rows(red, val.ids, val.valid, MODEL_CFG.image_token_index)
        vr = {"feats": val.feats[val.q_image], "mix": red.mix, "ids": val.ids, "valid": v2, "positions": p2,
              "labels": val.labels}
        eval_red = jax.jit(functools.partial(evaluate_features, graphdef))
    aug_rng = np.random.default_rng([cfg.seed, 11])
    t2 = time.time()
    bounds = np.cumsum([n for _, n in phases])
    for step in range(cfg.steps):
        k = int(np.searchsorted(bounds, step, side="right"))
        src = cur_pools[k] if k < len(phases) else pool
        b = batch_of(src, rng.integers(0, len(src.ids), cfg.batch))
        if cfg.freeze_tower:
            b = {k: b[k] for k in ("ids", "labels", "qlabels", "valid", "positions")} | {
                "feats": src.feats[src.q_image[b["rows"]]], "arow": src.arow[b["rows"]],
                "atarget": src.atarget[b["rows"]], "wtarget": src.wtarget[b["rows"]], "arow2": src.arow2[b["rows"]],
                "pcolour": src.colour[src.q_image[b["rows"]]], "pshape": src.shape[src.q_image[b["rows"]]]}
            if aug.prob > 0:
                b = augment_batch(aug_rng, b, aug, _G, MODEL_CFG.image_token_index, np.asarray(_PATCH_CELL))
            train_p, state, met = frozen_step(train_p, vision, state, b)
            params = dict(train_p, vision=vision)
        else:
            b.pop("rows")
            params, heads, state, met = full_step(params, heads, state, b)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            hits = np.asarray(evaluate(params, vb))
            per = {f"val_{q}": round(float(hits[val.q_type == i].mean()), 3) for i, q in enumerate(QTYPES)}
            if vr is not None:
                rh = np.asarray(eval_red(params, vr))
                per |= {f"val_random{cfg.val_reduced}": round(float(rh.mean()), 4)} | {
                    f"val_random{cfg.val_reduced}_{q}": round(float(rh[val.q_type == i].mean()), 3)
                    for i, q in enumerate(QTYPES)}
            log.append({"stage": "llava", "step": step + 1, "seconds": round(time.time() - t2, 1),
                        **{k: round(float(v), 4) for k, v in met.items()},
                        "val_exact": round(float(hits.mean()), 4), **per})
            print(log[-1], flush=True)
            if log_path is not None:
                log_path.write_text(json.dumps(log, indent=1))
    trained = jp.Llava.from_params(MODEL_CFG, _flat(params))
    log.append({"event": "done", "total_seconds": round(time.time() - t0, 1)})
    if out is not None:
        export(trained, out, cfg.scene_style)
    if log_path is not None:
        log_path.write_text(json.dumps(log, indent=1))
    return trained, log


def caption_stage(cfg: TrainConfig, graphdef, params: dict, pool: Pool, tok, log: list, log_path: Path | None
                  ) -> dict:
    """LLaVA stage 1 on the training images' captions (:mod:`experiments.synthvqa.captions`): ``caption_steps``
    steps moving only ``caption_train``'s groups; returns the updated parameters."""
    from jaxprune.eval.synthvqa.dataset import make_items as _items

    groups = parse_groups(cfg.caption_train)
    scenes = [it.scene for it in _items("train", cfg.seed, len(pool.images), style=cfg.scene_style)]
    ids, labels, valid = caption_pool(scenes, tok, MODEL_CFG.image_token_index, N_VISUAL)
    opt = _optimizer(cfg.caption_lr, cfg.caption_steps, min(cfg.warmup, cfg.caption_steps // 4), cfg.weight_decay)
    train_p = {g: params[g] for g in groups}
    frozen = {k: v for k, v in params.items() if k not in groups}
    state = opt.init(train_p)
    step_fn = make_caption_step(graphdef, groups, opt, cfg.align_weight)
    rng = np.random.default_rng([cfg.seed, 5])
    t0 = time.time()
    for step in range(cfg.caption_steps):
        i = rng.integers(0, len(ids), cfg.caption_batch)
        b = {"feats": pool.feats[i], "ids": ids[i], "labels": labels[i], "valid": valid[i],
             "pcolour": pool.colour[i], "pshape": pool.shape[i]}
        train_p, state, met = step_fn(train_p, frozen, state, b)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.caption_steps:
            log.append({"stage": "caption", "step": step + 1, "seconds": round(time.time() - t0, 1),
                        **{k: round(float(v), 4) for k, v in met.items()}})
            print(log[-1], flush=True)
            if log_path is not None:
                log_path.write_text(json.dumps(log, indent=1))
    return {**frozen, **train_p}


def _load_init(path: str) -> jp.Llava:
    import tempfile

    from jaxprune.checkpoints import convert

    with tempfile.TemporaryDirectory() as d:
        convert(Path(path), Path(d) / "c")
        m = jp.load(Path(d) / "c")
    if m.cfg != MODEL_CFG:
        raise ValueError(f"--init {path}: its config differs from MODEL_CFG")
    return m


def parse_curriculum(spec: str) -> list[tuple[tuple[int, int], int]]:
    """``"1-1:150,1-2:250"`` -> ``[((1, 1), 150), ((1, 2), 250)]``."""
    out = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        try:
            rng, n = part.split(":")
            lo, hi = (int(x) for x in rng.split("-"))
            n = int(n)
        except ValueError:
            raise ValueError(f"curriculum phase {part!r} is not 'min-max:steps'") from None
        if not (1 <= lo <= hi <= 9 and n > 0):
            raise ValueError(f"curriculum phase {part!r}: need 1 <= min <= max <= 9 objects and steps > 0")
        out.append(((lo, hi), n))
    return out


def _flat(params: dict) -> dict[str, np.ndarray]:
    out = {}

    def rec(prefix, x):
        if isinstance(x, dict):
            for k, v in x.items():
                rec(prefix + (str(k),), v)
        else:
            out[".".join(prefix)] = np.asarray(x)
    rec((), params)
    return out


def export(model: jp.Llava, dst: Path, scene_style: str = "grid") -> Path:
    """HF LLaVA checkpoint (legacy keys, fp32 safetensors) + tokenizer + preprocessor config in ``dst``, and the
    scene style it was trained on (:data:`jaxprune.eval.builtin.STYLE_FILE`: the built-in benchmark follows it)."""
    import tempfile

    from jaxprune.checkpoints import export_hf
    from jaxprune.eval.builtin import STYLE_FILE

    with tempfile.TemporaryDirectory() as d:
        sup = save_word_tokenizer(tokenizer().backend_tokenizer, Path(d) / "tok")
        s = MODEL_CFG.vision.image_size
        (sup / "preprocessor_config.json").write_text(json.dumps({
            "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": s},
            "resample": 3, "do_center_crop": True, "crop_size": {"height": s, "width": s}, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(OPENAI_CLIP_MEAN),
            "image_std": list(OPENAI_CLIP_STD), "do_convert_rgb": True}, indent=2))
        export_hf(MODEL_CFG, model.flat_params(), dst, layout="legacy", support_dir=sup, force=True)
    (dst / STYLE_FILE).write_text(json.dumps({"scene_style": scene_style}) + "\n")
    return dst


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="HF checkpoint folder to write")
    ap.add_argument("--log", type=Path, default=None, help="JSON training log")
    for f in dataclasses.fields(TrainConfig):
        typ = (lambda v: v.lower() in ("1", "true", "yes")) if isinstance(f.default, bool) else type(f.default)
        ap.add_argument("--" + f.name.replace("_", "-"), type=typ, default=f.default)
    a = ap.parse_args(argv)
    cfg = TrainConfig(**{f.name: getattr(a, f.name) for f in dataclasses.fields(TrainConfig)})
    print(cfg, flush=True)
    train(cfg, a.out, a.log)


if __name__ == "__main__":
    main()
