"""Training batches (vicuna_v1 strings, answer-only labels) and the fast image normalisation."""

import json

import numpy as np
import PIL.Image
import pytest

from jaxprune.eval.synthvqa.dataset import make_items, render_items
from experiments.synthvqa.train import MODEL_CFG, N_VISUAL, normalize, tokenizer
from experiments.train.batches import collate, encode, read_llava_instructions, render_conversation
from jaxprune.processing import ImageProcessorConfig, build_vicuna_v1_prompt, preprocess_images, tokenize_prompts

IMG = MODEL_CFG.image_token_index


def test_prompt_part_matches_the_eval_prompt():
    tok = tokenizer()
    q = "What color is the circle?\nAnswer the question using a single word or phrase."
    ids, labels = encode(tok, [("<image>\n" + q, "red")], IMG, N_VISUAL)
    ev = tokenize_prompts(tok, [build_vicuna_v1_prompt(q)], IMG, N_VISUAL)["input_ids"][0]
    # training ids = eval prompt ids + answer + </s>
    np.testing.assert_array_equal(ids[:len(ev)], ev)
    assert tok.convert_ids_to_tokens(ids[len(ev):].tolist()) == ["red", "</s>"]
    # next-token labels: the last prompt token predicts the answer, the answer predicts </s>
    assert labels[len(ev) - 1] == tok.convert_tokens_to_ids("red") and labels[len(ev)] == 2
    assert (labels[:len(ev) - 1] == -1).all() and labels[-1] == -1


def test_multi_turn_labels_cover_every_answer():
    tok = tokenizer()
    text, spans = render_conversation([("<image>\nIs there a red circle?", "yes"), ("Where is it?", "top left")])
    assert [text[a:b] for a, b in spans] == ["yes</s>", "top left</s>"]
    ids, labels = encode(tok, [("<image>\nIs there a red circle?", "yes"), ("Where is it?", "top left")], IMG, N_VISUAL)
    targets = [tok.convert_ids_to_tokens(int(x)) for x in labels[labels >= 0]]
    assert targets == ["yes", "</s>", "top", "left", "</s>"]
    assert (ids == IMG).sum() == N_VISUAL


def test_missing_image_token_and_collate_errors():
    tok = tokenizer()
    with pytest.raises(ValueError, match="image tokens"):
        encode(tok, [("<image>\nhi", "yes")], IMG - 1, N_VISUAL)  # wrong id
    rows = [encode(tok, [("<image>\nhi", "yes")], IMG, 4), encode(tok, [("<image>\nhi there", "no")], IMG, 4)]
    b = collate(rows, bucket=8)
    assert b.input_ids.shape[1] % 8 == 0 and b.valid.sum(1).tolist() == [len(r[0]) for r in rows]
    with pytest.raises(ValueError, match="shorter"):
        collate(rows, length=3)


def test_read_llava_instructions(tmp_path):
    p = tmp_path / "data.json"
    p.write_text(json.dumps([{"id": "a", "image": "x.png", "conversations": [
        {"from": "human", "value": "What color?"}, {"from": "gpt", "value": "red"}]}]))
    (conv,) = read_llava_instructions(p)
    assert conv.image == "x.png" and conv.turns[0][0].startswith("<image>\n")
    p.write_text(json.dumps([{"conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]}]))
    with pytest.raises(ValueError, match="record 0"):
        read_llava_instructions(p)


def test_normalize_equals_llava_preprocessing():
    images = render_items(make_items("val", 3, 4)).images
    s = MODEL_CFG.vision.image_size
    cfg = ImageProcessorConfig(image_size=s, shortest_edge=s, mode="pad")
    ref = preprocess_images([PIL.Image.fromarray(a) for a in images], cfg)
    np.testing.assert_allclose(normalize(images), ref, atol=1e-6)
