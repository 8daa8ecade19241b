"""Issue #16 training-recipe pieces: the "large" scene style (default scenes unchanged), caption alignment, and the
training-time visual-token reduction augmentation."""

from __future__ import annotations

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.synthvqa.augment import (ReductionAug, answer_index, augment_batch, mask_unseen_answers, mix_tokens,
                                          random_keep, reduce_rows, sample_reduction, visible_targets)
from experiments.synthvqa.captions import caption, caption_pool
from jaxprune.eval.synthvqa.dataset import make_item
from jaxprune.eval.synthvqa.scene import COLOURS, GRID, render

P = GRID * GRID


def test_default_scenes_are_the_same_bytes_as_before_the_style_option():
    """Digest of the images and questions the generator gave before ``style`` existed (commit 8b22477)."""
    h = hashlib.sha256()
    for i in range(6):
        for it in (make_item("test", 0, i), make_item("train", 3, i, objects=(1, 2))):
            h.update(render(it.scene).image.tobytes())
            h.update(repr(it.qas).encode())
    assert h.hexdigest() == "c0c07309ac1d41994c81a1fa3594c567d7a3b4adb97cbef0f95288be75058378"
    assert make_item("test", 0, 0, style="grid") == make_item("test", 0, 0)


def test_large_style_objects_span_many_patches_on_a_grey_texture():
    sizes, n_patches = [], []
    for i in range(12):
        it = make_item("train", 0, i, style="large")
        assert it.image_id.endswith("_large") and it.scene.style == "large"
        rd = render(it.scene)
        np.testing.assert_array_equal(rd.image, render(make_item("train", 0, i, style="large").scene).image)
        for o in it.scene.objects:
            sizes.append(o.size)
            colour_id = list(COLOURS).index(o.colour) + 1
            cy, cx = o.cy // 8, o.cx // 8
            assert rd.colour_map[cy, cx] == colour_id  # the centre patch is the object's
        n_patches.append((rd.colour_map > 0).sum() / len(it.scene.objects))
        bg = rd.colour_map.repeat(8, 0).repeat(8, 1) == 0
        px = rd.image[bg].astype(int)
        # background pixels are grey (objects' anti-aliased edges aside: patches labelled background may hold a
        # sliver of an object, so allow a few)
        assert np.mean(np.abs(px[:, 0] - px[:, 1]) + np.abs(px[:, 1] - px[:, 2]) == 0) > 0.9
    assert set(sizes) == {24, 32}
    assert np.mean(n_patches) >= 8  # vs 4 patches per object in the default style
    with pytest.raises(ValueError, match="unknown scene style"):
        make_item("train", 0, 0, style="huge")


def test_caption_rows_label_the_caption_only():
    from experiments.synthvqa.train import MODEL_CFG, N_VISUAL, tokenizer

    tok = tokenizer()
    scenes = [make_item("train", 0, i, style=s).scene for i, s in ((0, "grid"), (1, "large"))]
    text = caption(scenes[0])
    assert text.startswith("a ") and text.count(" . ") + 1 == len(scenes[0].objects)
    ids, labels, valid = caption_pool(scenes, tok, MODEL_CFG.image_token_index, N_VISUAL)
    for i, sc in enumerate(scenes):
        n_words = len(caption(sc).split())
        assert (labels[i] >= 0).sum() == n_words + 1  # every word and </s>
        lab = labels[i][labels[i] >= 0]
        assert tok.decode(lab[:-1].tolist()) == caption(sc) and lab[-1] == tok.convert_tokens_to_ids("</s>")
        t = np.flatnonzero(labels[i] >= 0)
        np.testing.assert_array_equal(labels[i][t], ids[i][t + 1])  # next-token targets
        assert valid[i].sum() == (ids[i] != 0).sum()


def test_caption_step_moves_only_the_projector():
    from flax import nnx

    import jaxprune as jp
    from experiments.synthvqa.train import MODEL_CFG, N_VISUAL, _optimizer, make_caption_step, tokenizer

    m = jp.Llava.random(MODEL_CFG, seed=0)
    params = nnx.to_pure_dict(m.params)
    scenes = [make_item("train", 0, i).scene for i in range(2)]
    ids, labels, valid = caption_pool(scenes, tokenizer(), MODEL_CFG.image_token_index, N_VISUAL)
    feats = np.random.default_rng(0).standard_normal((2, N_VISUAL, MODEL_CFG.vision.hidden_size)).astype(np.float32)
    opt = _optimizer(1e-2, 10, 1, 0.0)
    train = {"projector": params["projector"]}
    frozen = {k: v for k, v in params.items() if k != "projector"}
    before = jax.tree.map(lambda a: np.array(a, copy=True), train)
    step = make_caption_step(m.graphdef, ("projector",), opt)
    batch = {"feats": feats, "ids": ids, "labels": labels, "valid": valid}
    new, state, met = step(train, frozen, opt.init(train), batch)  # step 0 of the warmup: learning rate 0
    for _ in range(2):  # each step reports the loss before its update
        new, state, met2 = step(new, frozen, state, batch)
    assert np.isfinite(float(met["caption_loss"])) and float(met2["caption_loss"]) < float(met["caption_loss"])
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)), new, before))
    assert any(moved)
    assert set(new) == {"projector"}  # the step returns (and can change) nothing else


def test_sample_reduction_drops_and_merges_tokens():
    aug = ReductionAug(prob=1.0, min_keep=8, merge_prob=0.4, keep_positions_prob=0.3)
    red = sample_reduction(np.random.default_rng(0), 64, GRID, aug)
    red2 = sample_reduction(np.random.default_rng(0), 64, GRID, aug)
    np.testing.assert_array_equal(red.keep, red2.keep)  # a pure function of the generator
    np.testing.assert_array_equal(red.mix, red2.mix)
    assert (red.keep.sum(1) == red.n_keep).all() and (red.n_keep >= 8).all() and (red.n_keep <= P).all()
    assert (red.n_keep < P).mean() > 0.9 and red.n_keep.min() < 20  # really reduced, down to the smallest budgets
    merged = ~np.all(red.mix == np.eye(P, dtype=np.float32)[None], axis=(1, 2))
    assert 0 < merged.sum() < 64 and (~red.renumber).sum() > 0
    np.testing.assert_allclose(red.mix.sum(-1), 1.0, atol=1e-6)  # every slot a mean of its group
    b = int(np.flatnonzero(merged)[0])
    kept = np.flatnonzero(red.keep[b])
    yx = np.stack(np.divmod(np.arange(P), GRID), 1)
    for q in range(P):  # each dropped patch went into its nearest kept patch (Chebyshev, lowest index on ties)
        owner = np.flatnonzero((red.mix[b][:, q] > 0) & red.keep[b])  # dropped slots' own rows are unused
        assert len(owner) == 1
        d = np.abs(yx[kept] - yx[q]).max(1)
        assert owner[0] == kept[np.argmin(d)]
    tok = jnp.asarray(np.random.default_rng(1).standard_normal((1, P, 5)), jnp.float32)
    out = np.asarray(mix_tokens(jnp.asarray(red.mix[b:b + 1]), tok))[0]
    k0 = kept[0]
    group = np.flatnonzero(red.mix[b][k0] > 0)
    np.testing.assert_allclose(out[k0], np.asarray(tok)[0, group].mean(0), atol=1e-5)
    none = sample_reduction(np.random.default_rng(0), 8, GRID, ReductionAug(prob=0.0))
    assert none.keep.all() and (none.n_keep == P).all()


def _rows(n_text=(5, 9), image_token=127):
    rows = [np.concatenate([[1, 3], np.full(P, image_token), np.arange(10, 10 + t)]) for t in n_text]
    T = max(len(r) for r in rows) + 2
    ids = np.zeros((len(rows), T), np.int32)
    valid = np.zeros((len(rows), T), bool)
    for i, r in enumerate(rows):
        ids[i, :len(r)], valid[i, :len(r)] = r, True
    return ids, valid


def test_reduce_rows_renumbers_or_keeps_positions():
    ids, valid = _rows()
    red = random_keep(np.random.default_rng(3), 2, GRID, 16)
    red = type(red)(red.keep, red.mix, np.array([True, False]), red.n_keep)
    v2, pos = reduce_rows(red, ids, valid, 127)
    assert (v2.sum(1) == valid.sum(1) - (P - 16)).all()
    np.testing.assert_array_equal(pos[0][v2[0]], np.arange(v2[0].sum()))  # renumbered: a shorter sequence
    np.testing.assert_array_equal(pos[1][v2[1]], np.flatnonzero(v2[1]))  # kept: the original positions
    img = ids[0] == 127
    np.testing.assert_array_equal(v2[0][img], red.keep[0])
    with pytest.raises(ValueError, match="exactly 144 image tokens"):
        reduce_rows(red, ids[:, 5:], valid[:, 5:], 127)


def test_answers_without_evidence_lose_their_loss():
    labels = np.full((1, 12), -1, np.int32)
    labels[0, 2:4] = 7   # answer 0
    labels[0, 6:8] = 8   # answer 1
    labels[0, 10] = 9    # answer 2
    np.testing.assert_array_equal(answer_index(labels)[0], [-1, -1, 0, 0, -1, -1, 1, 1, -1, -1, 2, -1])
    atarget = np.zeros((1, 4, P), np.float32)
    atarget[0, 0, [0, 1]] = 1   # answer 0 about patches 0, 1 (both dropped)
    atarget[0, 1, [50]] = 1     # answer 1 about patch 50 (kept)
    keep = np.zeros((1, P), bool)
    keep[0, [50, 100]] = True
    red = random_keep(np.random.default_rng(0), 1, GRID, 2)
    red = type(red)(keep, red.mix, red.renumber, np.array([2]))
    vis = visible_targets(red, atarget)
    assert vis[0, 0].sum() == 0 and vis[0, 1, 50] == 1 and vis[0, 1].sum() == 1
    out = mask_unseen_answers(labels, atarget, vis)
    assert (out[0, 2:4] == -1).all() and (out[0, 6:8] == 8).all() and out[0, 10] == 9  # no target: kept
    mix = np.broadcast_to(np.eye(P, dtype=np.float32), (1, P, P)).copy()
    mix[0, 100] = 0
    mix[0, 100, [0, 100]] = 0.5  # patch 0 merged into kept slot 100: answer 0's evidence survives there
    vis2 = visible_targets(type(red)(keep, mix, red.renumber, np.array([2])), atarget)
    assert vis2[0, 0, 100] == 1 and (mask_unseen_answers(labels, atarget, vis2)[0, 2:4] == 7).all()


def test_augment_batch_shapes_and_invariants():
    ids, valid = _rows()
    B, T = ids.shape
    labels = np.full((B, T), -1, np.int32)
    labels[:, -4] = 5
    batch = {"ids": ids, "valid": valid, "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)),
             "labels": labels, "qlabels": np.where(valid, 4, -1).astype(np.int32),
             "atarget": np.ones((B, 4, P), np.float32), "feats": np.zeros((B, P, 3), np.float32)}
    out = augment_batch(np.random.default_rng(0), batch, ReductionAug(prob=1.0), GRID, 127)
    assert out["mix"].shape == (B, P, P) and out["valid"].shape == (B, T) and out["positions"].dtype == np.int32
    assert (out["valid"].sum(1) < valid.sum(1)).all()
    assert not (out["qlabels"][~out["valid"]] >= 0).any()
    assert out["atarget"].shape == (B, 4, P) and (out["atarget"].sum(-1) > 0).all()
    assert (out["labels"] == labels).all()  # every answer still has evidence (all patches were targets)


def test_object_biased_draws_move_the_object_share_both_ways():
    """v11: half the biased draws favour object patches, half avoid them; uniform draws sit in between."""
    B = 400
    objects = np.zeros((B, P), bool)
    objects[:, :36] = True  # a quarter of the image is object
    red = sample_reduction(np.random.default_rng(0), B, GRID, ReductionAug(prob=1.0, min_keep=16, object_bias=1.0,
                                                                          max_bias=8.0), objects)
    share = (red.keep & objects).sum(1) / red.keep.sum(1)
    assert (share > 0.6).mean() > 0.2 and (share < 0.1).mean() > 0.2  # far above and below the uniform 0.25
    uni = sample_reduction(np.random.default_rng(0), B, GRID, ReductionAug(prob=1.0, min_keep=16))
    assert abs(((uni.keep & objects).sum(1) / uni.keep.sum(1)).mean() - 0.25) < 0.03
    with pytest.raises(ValueError, match="object_bias needs objects"):
        sample_reduction(np.random.default_rng(0), 2, GRID, ReductionAug(prob=1.0, object_bias=0.5))
    with pytest.raises(ValueError, match="evidence"):
        ReductionAug(evidence="some")


def test_per_object_bias_decouples_one_objects_share_from_anothers():
    """v12: with one bias per row two objects keep about the same share of the kept tokens (one colour's share
    follows the count); drawn per object, their shares no longer move together."""
    B = 400
    groups = (np.arange(GRID)[:, None] * 3 // GRID * 3 + np.arange(GRID)[None, :] * 3 // GRID).reshape(-1)
    objects = np.zeros((B, P), bool)
    objects[:, (groups == 0) | (groups == 8)] = True  # two objects: first and last cell
    rng = np.random.default_rng(1)

    def shares(per: str) -> tuple[np.ndarray, np.ndarray]:
        red = sample_reduction(rng, B, GRID, ReductionAug(prob=1.0, min_keep=32, object_bias=1.0, bias_per=per),
                               objects, groups)
        k = red.keep.sum(1)
        return (red.keep & (groups == 0)).sum(1) / k, (red.keep & (groups == 8)).sum(1) / k

    assert np.corrcoef(*shares("all"))[0, 1] > 0.8
    assert abs(np.corrcoef(*shares("object"))[0, 1]) < 0.3
    with pytest.raises(ValueError, match="needs groups"):
        sample_reduction(rng, 2, GRID, ReductionAug(prob=1.0, object_bias=0.5, bias_per="object"), objects[:2])
    with pytest.raises(ValueError, match="bias_per"):
        ReductionAug(bias_per="cell")


def test_every_object_evidence_masks_a_count_with_one_object_gone():
    labels = np.full((1, 6), -1, np.int32)
    labels[0, 2] = 7
    atarget = np.zeros((1, 4, P), np.float32)
    atarget[0, 0, [0, 1, 140, 141]] = 1  # two objects (first and last 3x3 cells)
    groups = (np.arange(GRID)[:, None] * 3 // GRID * 3 + np.arange(GRID)[None, :] * 3 // GRID).reshape(-1)
    vis = np.zeros_like(atarget)
    vis[0, 0, 1] = 1  # only the first object is still seen
    assert mask_unseen_answers(labels, atarget, vis)[0, 2] == 7  # "any": some evidence left, kept
    assert mask_unseen_answers(labels, atarget, vis, groups)[0, 2] == -1  # one object gone: no loss
    vis[0, 0, 141] = 1
    assert mask_unseen_answers(labels, atarget, vis, groups)[0, 2] == 7


def test_second_answer_words_get_a_query_row():
    from experiments.synthvqa.train import build_pool, tokenizer

    tok = tokenizer()
    pool = build_pool("train", 0, 6, tok, multi_turn=True, style="large")
    eos = 2
    for r in range(len(pool.ids)):
        for j in range(4):
            a = pool.arow[r, j]
            if pool.atarget[r, j].sum() == 0 and a == 0:
                continue
            two = pool.labels[r, a + 1] >= 0 and pool.labels[r, a + 1] != eos
            assert (pool.arow2[r, j] == a + 1) == two and (pool.arow2[r, j] == 0) == (not two)
    words = {tok.decode([int(pool.labels[r, pool.arow[r, j]])]) for r, j in zip(*np.nonzero(pool.arow2))}
    assert words and words <= {"top", "bottom"}


@pytest.mark.slow
def test_train_runs_every_new_stage_end_to_end(tmp_path):
    """A few steps of each stage with every issue-16 option on (compiles: about a minute of CPU)."""
    from experiments.synthvqa.train import TrainConfig, train

    cfg = TrainConfig(n_train_images=8, tower_steps=1, tower_batch=4, caption_steps=2, caption_batch=4, steps=2,
                      batch=4, warmup=1, eval_every=1, n_val_images=4, scene_style="large", aug_prob=1.0,
                      val_reduced=8, align_weight=1.0, aug_object_bias=0.5, aug_evidence="every_object",
                      attn_every_word=True, aug_bias_per="object")
    model, log = train(cfg, log_path=tmp_path / "log.json")
    stages = [r.get("stage") for r in log]
    assert stages.count("caption") == 2 and stages.count("llava") == 2
    last = [r for r in log if r.get("stage") == "llava"][-1]
    assert "val_random8" in last and 0.0 <= last["val_random8"] <= 1.0 and np.isfinite(last["loss"])
    assert np.isfinite([r["caption_loss"] for r in log if r.get("stage") == "caption"]).all()
    assert all(r["align_loss"] > 0 for r in log if r.get("stage") in ("caption", "llava"))


def test_word_patch_loss_ranks_the_words_patches():
    """The alignment term is low when a word's patches are the most similar to it, high when other patches are,
    and ignores words absent from an image."""
    import jax.numpy as jnp

    from experiments.synthvqa.align import word_labels, word_patch_loss

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((3, 16)).astype(np.float32)  # 3 words
    labels = np.zeros((1, 6, 3), bool)
    labels[0, :2, 0] = True   # patches 0-1 show word 0
    labels[0, 2:4, 1] = True  # patches 2-3 show word 1; word 2 absent
    good = np.concatenate([emb[[0, 0, 1, 1]], rng.standard_normal((2, 16))]).astype(np.float32)[None]
    bad = np.concatenate([emb[[1, 1, 0, 0]], rng.standard_normal((2, 16))]).astype(np.float32)[None]
    lg, lb = float(word_patch_loss(jnp.asarray(good), jnp.asarray(emb), jnp.asarray(labels))), \
        float(word_patch_loss(jnp.asarray(bad), jnp.asarray(emb), jnp.asarray(labels)))
    assert lg < 0.05 < 2.0 < lb
    # the absent word changes nothing; no word present anywhere -> 0
    labels3 = labels.copy()
    emb3 = emb.copy()
    emb3[2] = good[0, 0]  # word 2 would be "aligned" with patch 0, but it is absent from the image
    assert np.isclose(float(word_patch_loss(jnp.asarray(good), jnp.asarray(emb3), jnp.asarray(labels3))), lg,
                      rtol=1e-5)
    assert float(word_patch_loss(jnp.asarray(good), jnp.asarray(emb), jnp.zeros((1, 6, 3), bool))) == 0.0
    # labels from the renderer's 1-based maps (0 = background)
    lab = np.asarray(word_labels(jnp.asarray([[0, 1, 2]]), jnp.asarray([[0, 2, 2]]), 2, 2))
    assert lab.tolist() == [[[False, False, False, False], [True, False, False, True], [False, True, False, True]]]
