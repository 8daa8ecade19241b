"""The lmms-eval model (``jaxprune.eval.lmms``): model_args, request handling, generation (``max_new_tokens``, stop
strings, one compile per shape), ``loglikelihood`` against ``transformers``' logits and against the reduced model's
own logits, the errors for rows a family cannot take, and the entry-point registration lmms-eval reads.

The end-to-end run of lmms-eval's own evaluator is ``tests/test_lmms_eval_e2e.py`` (slow)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest

from jaxprune.eval.config import ConfigError, ItemError, ReducerSpec

REPO = Path(__file__).resolve().parents[1]


# ---- pure: model_args, generation settings, stop strings, visuals, prompts -------------------------------------------
def test_model_args_parse_reducer_with_the_harness_grammar():
    from jaxprune.eval.lmms.options import parse_model_args

    o = parse_model_args({"pretrained": "/m", "reducer": "fastv:64", "dtype": "bfloat16", "batch_size": 16,
                          "device": "cuda", "max_batch_size": None})
    assert o.reducer == ReducerSpec.parse("fastv:64") == ReducerSpec("fastv", 64)
    assert (o.dtype, o.batch_size, o.pretrained) == ("bfloat16", 16, "/m")
    assert parse_model_args({"pretrained": "/m"}).reducer.is_full
    assert parse_model_args({"pretrained": "/m", "reducer": "full", "batch_size": "4"}).batch_size == 4
    for bad, word in [({"pretrained": "/m", "reducer": "fastv"}, "NAME:BUDGET"),
                      ({"pretrained": "/m", "reducer": "fastv:x"}, "not an integer"),
                      ({"pretrained": "/m", "dtype": "int8"}, "dtype"),
                      ({"pretrained": "/m", "batch_size": 0}, "batch_size"),
                      ({"pretrained": "/m", "batch_size": "auto"}, "batch_size"),
                      ({"pretrained": "/m", "conv_template": "x"}, "conv_template"),
                      ({}, "pretrained")]:
        with pytest.raises(ConfigError, match=word):
            parse_model_args(bad)


def test_gen_settings_until_and_max_new_tokens():
    from jaxprune.eval.lmms.requests import gen_settings

    s, w = gen_settings({"until": "\n\n", "max_new_tokens": 7, "temperature": 0}, 1024, "</s>")
    assert s.until == ("\n\n",) and s.max_new_tokens == 7 and not w
    s, _ = gen_settings({"until": ["</s>", "", "Q:", "Q:"]}, 1024, "</s>")  # EOS always stops; empty ignored
    assert s.until == ("Q:",) and s.max_new_tokens == 1024
    _, w = gen_settings({"temperature": 0.7, "do_sample": True, "num_beams": 3}, 16)
    assert len(w) == 2 and "greedy" in w[0]
    with pytest.raises(ConfigError, match="task t doc 3.*max_new_tokens"):
        gen_settings({"max_new_tokens": 0}, 16, where="task t doc 3")
    with pytest.raises(ConfigError, match="until"):
        gen_settings({"until": 5}, 16)


def test_cut_at_stop_takes_the_earliest_stop_string():
    from jaxprune.eval.lmms.requests import cut_at_stop

    assert cut_at_stop("yes. no\n\nQ: more", ["\n\n", "Q:"]) == "yes. no"
    assert cut_at_stop("abc Q: x\n\n", ["\n\n", "Q:"]) == "abc "
    assert cut_at_stop("abc", ["zz", ""]) == "abc"
    assert cut_at_stop("abc", []) == "abc"


def test_visuals_a_family_cannot_take_name_task_and_doc():
    from PIL import Image

    from jaxprune.eval.lmms.requests import check_visuals, where

    im = Image.new("RGB", (8, 8))
    assert check_visuals([im], "llava", where("pope", 3)) == (im,)
    assert check_visuals([], "llava", "x") == () and check_visuals(None, "llava", "x") == ()
    with pytest.raises(ItemError, match=r"task mmmu doc 12: 2 images; LLaVA-1\.5 .*one image per request"):
        check_visuals([im, im], "llava", where("mmmu", 12))
    with pytest.raises(ItemError, match=r"task videomme doc 4: a video .*clip\.mp4.*images only"):
        check_visuals(["/data/clip.mp4"], "llava_next", where("videomme", 4))
    with pytest.raises(ItemError, match=r"task a doc 1: a visual of type dict"):
        check_visuals([{"array": [0.0]}], "llava", where("a", 1))


def test_prompt_is_the_harness_prompt():
    from jaxprune.eval.lmms.requests import chat_prompt, continuation_text
    from jaxprune.processing import build_vicuna_v1_prompt

    q = "Is there a dog?\nAnswer the question using a single word or phrase."
    assert chat_prompt(q, 1) == build_vicuna_v1_prompt(q, with_image=True)
    assert chat_prompt(q, 0) == build_vicuna_v1_prompt(q, with_image=False)
    assert chat_prompt("<image>\n" + q, 1) == build_vicuna_v1_prompt(q, with_image=True)
    with pytest.raises(ItemError, match="task t doc 1: the context holds 1"):
        chat_prompt("<image> x", 0, "task t doc 1")
    p = chat_prompt(q, 1)
    assert continuation_text(p, "A") == continuation_text(p, " A") == p + " A"


def test_pyproject_registers_the_lmms_eval_entry_point():
    p = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert p["project"]["entry-points"]["lmms_eval.models"] == {"jaxprune": "jaxprune.eval.lmms:manifest"}
    assert not [d for d in p["project"]["optional-dependencies"]["lmms"]
                if d.split("=")[0].split(">")[0] in ("torchvision", "lmms-eval", "lmms_eval", "decord")]


# ---- a tiny LLaVA-1.5 checkpoint through the backend --------------------------------------------------------------
torch = pytest.importorskip("torch")


def build_yes_no_llava(dst: Path, seed: int = 0, calibration=None) -> Path:
    """A tiny random HF LLaVA-1.5 (+ the demo word tokenizer) whose head answers ``yes`` or ``no`` (every other
    vocabulary row is scaled down). ``calibration``: ``[(input_ids, pixel_values [3, S, S])]`` rows; the yes / no
    direction is then their centred final hidden states' leading direction, so those rows get both answers (a
    POPE-like score that is not trivial)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from jaxprune.eval.demo_model import DEMO_CFG, demo_tokenizer, save_demo_tokenizer
    from tests.conftest import perturb_

    tc = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=DEMO_CFG.text.vocab_size, eos_token_id=2, pad_token_id=0,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                          image_size=28, patch_size=7)
    cfg = LlavaConfig(text_config=tc, vision_config=vc, image_token_index=DEMO_CFG.image_token_index,
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    hf = perturb_(LlavaForConditionalGeneration(cfg).eval())
    yes, no = (demo_tokenizer().token_to_id(w) for w in ("yes", "no"))
    with torch.no_grad():
        w = hf.lm_head.weight
        d = torch.randn(w.shape[1])
        m = torch.zeros(w.shape[1])
        if calibration:
            seen = []
            hook = hf.lm_head.register_forward_hook(lambda mod, args, out: seen.append(args[0][0, -1].clone()))
            for ids, px in calibration:
                hf(input_ids=torch.tensor([list(ids)]), pixel_values=torch.tensor(np.asarray(px)[None]))
            hook.remove()
            h = torch.stack(seen)                                  # [N, hidden]
            m = h.mean(0)
            d = torch.linalg.svd(h - m, full_matrices=False)[2][0]  # leading direction of the centred states
            d = d - (d @ m) / (m @ m) * m
            d, m = d / d.norm() * 8.0 / (h - m).norm(dim=1).mean(), m / m.norm() * 2.0 / m.norm()
        w.mul_(0.05)
        w[yes], w[no] = m + d, m - d
    hf.save_pretrained(dst)
    save_demo_tokenizer(dst)
    return dst


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_yes_no_llava(tmp_path_factory.mktemp("tiny-llava-yesno"))


@pytest.fixture(scope="module")
def backend(tiny_dir):
    from jaxprune.eval.lmms.backend import Backend
    from jaxprune.eval.lmms.options import parse_model_args

    return Backend(parse_model_args({"pretrained": str(tiny_dir), "batch_size": 2}))


def _images(n: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (20 + 7 * i, 31, 3), dtype=np.uint8)) for i in range(n)]


def test_generate_honours_max_new_tokens_and_stop_strings(backend):
    from jaxprune.eval.lmms.requests import GenRequest, GenSettings

    im = _images(3)
    q = ["is there a red square in the image ?", "what color", "how many circle"]
    full = backend.generate([GenRequest(t, (i,), GenSettings(6)) for t, i in zip(q, im)])
    assert all(len(t.split()) == 6 for t in full), full  # no EOS: the head only says yes / no
    n_compiled = len(backend.ctx.cache)
    # max_new_tokens 2: the first two words of the same greedy continuation; a stop string cuts the text before it
    stops = [t.split()[2] for t in full]
    short = backend.generate([GenRequest(t, (i,), GenSettings(2)) for t, i in zip(q, im)])
    cut = backend.generate([GenRequest(t, (i,), GenSettings(6, (s,))) for t, i, s in zip(q, im, stops)])
    assert short == [" ".join(t.split()[:2]) for t in full]
    assert cut == [t[:t.find(s)] for t, s in zip(full, stops)]
    assert len(backend.ctx.cache) == n_compiled + 1  # max_new_tokens=2 is the one new program; 6 ran again as is
    # a text-only row next to image rows (its own group), results in request order
    mixed = backend.generate([GenRequest(q[0], (im[0],), GenSettings(6)), GenRequest("how many", (), GenSettings(3))])
    assert mixed[0] == full[0] and len(mixed[1].split()) == 3


def _hf_logprobs(tiny_dir, ids, px):
    from transformers import LlavaForConditionalGeneration

    hf = LlavaForConditionalGeneration.from_pretrained(tiny_dir).eval()
    with torch.no_grad():
        out = hf(input_ids=torch.tensor([ids]), pixel_values=None if px is None else torch.tensor(px[None]))
    return torch.log_softmax(out.logits[0].double(), -1).numpy()  # [T, V]


def test_loglikelihood_equals_transformers_log_softmax(backend, tiny_dir):
    from jaxprune.eval.lmms.requests import LoglikRequest, chat_prompt, continuation_text

    im = _images(2, seed=1)
    ctx = "is there a red square in the image ?"
    prompt = chat_prompt(ctx, 1)
    ctx_ids = backend.encode(0, prompt, im[0], "t").ids
    lp_ctx = _hf_logprobs(tiny_dir, list(ctx_ids), backend.encode(0, prompt, im[0], "t").pixels)
    greedy_word = backend.tokenizer.decode([int(lp_ctx[-1].argmax())])
    other = "no" if greedy_word == "yes" else "yes"
    conts = [greedy_word, other, " red square yes", "circle"]
    reqs = [LoglikRequest(ctx, c, (im[0],)) for c in conts] + [LoglikRequest("how many", "yes no", ())]
    got = backend.loglikelihood(reqs)
    for r, (lp, is_greedy) in zip(reqs, got):
        img = r.images[0] if r.images else None
        p = chat_prompt(r.context, len(r.images))
        full = backend.encode(0, continuation_text(p, r.continuation), img, "t")
        n = len(backend.encode(0, p, img, "t").ids)
        ref = _hf_logprobs(tiny_dir, list(full.ids), full.pixels)
        cont = full.ids[n:]
        want = sum(ref[n - 1 + j, t] for j, t in enumerate(cont))
        want_greedy = all(int(ref[n - 1 + j].argmax()) == t for j, t in enumerate(cont))
        assert len(cont) >= 1 and lp == pytest.approx(want, abs=2e-4), (r.continuation, lp, want)
        assert is_greedy == want_greedy, r.continuation
    assert got[0][1] is True and got[1][1] is False


def test_loglikelihood_with_a_reducer_reads_the_reduced_logits(tiny_dir):
    """fastv (in-LLM) and visionzip (projector): the backend's score equals log_softmax of ``model(...)``'s own
    logits with that reducer (its last positions) on the single row."""
    from jaxprune.eval.lmms.backend import Backend
    from jaxprune.eval.lmms.options import parse_model_args
    from jaxprune.eval.lmms.requests import LoglikRequest, chat_prompt, continuation_text
    from jaxprune.eval.runner import make_reducer

    im = _images(3, seed=2)
    for spec in ("fastv:5", "visionzip:6"):
        b = Backend(parse_model_args({"pretrained": str(tiny_dir), "batch_size": 2, "reducer": spec}))
        reqs = [LoglikRequest("what color", c, (i,)) for c, i in zip(["red", " yes no", "square yes"], im)]
        got = b.loglikelihood(reqs)
        red = make_reducer(ReducerSpec.parse(spec), b.ctx.model.cfg)
        for r, (lp, _) in zip(reqs, got):
            p = chat_prompt(r.context, 1)
            full = b.encode(0, continuation_text(p, r.continuation), r.images[0], "t")
            n = len(b.encode(0, p, r.images[0], "t").ids)
            out = b.ctx.model(np.asarray([full.ids]), full.pixels[None], reducer=red)
            logits = np.asarray(out.logits[0], np.float64)
            ls = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
                - logits.max(-1, keepdims=True)
            k = len(full.ids) - n
            want = sum(ls[len(ls) - 1 - k + j, t] for j, t in enumerate(full.ids[n:]))
            assert lp == pytest.approx(want, abs=2e-4), (spec, r.continuation)


# ---- the lmms-eval adapter (needs lmms-eval: `pip install --no-deps lmms-eval` + the `lmms` extra) ---------------
def _lmms():
    return pytest.importorskip("lmms_eval.api.instance")


def _instance(kind, args, doc_id=0, task="t"):
    inst_mod = _lmms()
    return inst_mod.Instance(request_type=kind, arguments=args, idx=0,
                             metadata={"task": task, "doc_id": doc_id, "repeats": 1})


def test_lmms_adapter_requests_and_errors(tiny_dir):
    _lmms()
    from jaxprune.eval.lmms.model import JaxpruneLMM
    from jaxprune.eval.lmms.requests import LoglikRequest

    lm = JaxpruneLMM.create_from_arg_string(f"pretrained={tiny_dir},reducer=fastv:5,batch_size=2",
                                            {"batch_size": "1", "device": "cuda:0", "max_batch_size": None})
    assert lm.backend.batch_size == 2 and lm.backend.opts.reducer == ReducerSpec("fastv", 5)
    im = _images(2, seed=3)
    lm.task_dict = {"t": {"test": [{"img": [im[0]]}, {"img": [im[0], im[1]]}, {"img": ["/v.mp4"]}]}}
    vis = lambda doc: doc["img"]  # noqa: E731
    gen = {"max_new_tokens": 3, "until": ["\n"], "temperature": 0}
    out = lm.generate_until([_instance("generate_until", ("what color", dict(gen), vis, 0, "t", "test"))])
    assert len(out) == 1 and len(out[0].split()) == 3
    ll = lm.loglikelihood([_instance("loglikelihood", ("what color", " yes", vis, 0, "t", "test")),
                           _instance("loglikelihood", ("what color", lambda doc: "no", vis, 0, "t", "test"))])
    # a string continuation is a multiple-choice request: lmms-eval takes argmin, so the score is -sum(log p);
    # doc_to_target (a callable) is output_type loglikelihood: sum(log p)
    assert len(ll) == 2 and ll[0][0] > 0 and ll[1][0] < 0 and all(isinstance(g, bool) for _, g in ll)
    assert -ll[0][0] == pytest.approx(lm.backend.loglikelihood([LoglikRequest("what color", " yes", (im[0],))])[0][0])
    (uncond,) = lm.loglikelihood([_instance("loglikelihood", ("", "yes"))])  # acc_mutual_info's 2-tuple
    assert uncond[0] > 0
    with pytest.raises(ItemError, match=r"task t doc 1: 2 images; LLaVA-1\.5"):
        lm.generate_until([_instance("generate_until", ("q", dict(gen), vis, 1, "t", "test"), doc_id=1)])
    with pytest.raises(ItemError, match=r"task t doc 2: a video"):
        lm.loglikelihood([_instance("loglikelihood", ("q", "yes", vis, 2, "t", "test"), doc_id=2)])
    with pytest.raises(ConfigError, match=r"task t: generate_until_multi_round is not implemented"):
        lm.generate_until_multi_round([_instance("generate_until_multi_round", ("q", {}, vis, None, 0, "t", "test"))])


def test_lmms_eval_resolves_jaxprune_through_its_entry_point():
    _lmms()
    import importlib.metadata as md

    eps = [ep for ep in md.entry_points(group="lmms_eval.models") if ep.name == "jaxprune"]
    assert eps, ("the installed jaxprune has no lmms_eval.models entry point: reinstall it "
                 "(pip install --no-deps -e .) after pulling the pyproject change")
    from lmms_eval.models import get_model

    from jaxprune.eval.lmms import manifest
    from jaxprune.eval.lmms.model import JaxpruneLMM

    assert manifest().simple_class_path == "jaxprune.eval.lmms.model.JaxpruneLMM"
    assert get_model("jaxprune") is JaxpruneLMM


_DEVICES_SCRIPT = r"""
import json, sys
import numpy as np
from PIL import Image
from jaxprune.eval.lmms.backend import Backend
from jaxprune.eval.lmms.options import parse_model_args
from jaxprune.eval.lmms.requests import GenRequest, GenSettings, LoglikRequest
rng = np.random.default_rng(5)
ims = [Image.fromarray(rng.integers(0, 256, (24, 30 + i, 3), dtype=np.uint8)) for i in range(5)]
gen = [GenRequest(f"what color {'red ' * i}", (im,), GenSettings(4)) for i, im in enumerate(ims)]
ll = [LoglikRequest("is there a square", c, (im,)) for c, im in zip(["yes", "no", " red", "circle yes"], ims)]
out = {}
for n in (1, 4):
    b = Backend(parse_model_args({"pretrained": sys.argv[1], "batch_size": 3, "num_devices": n,
                                  "reducer": "visionzip:6"}))
    out[n] = {"mesh": b.ctx.mesh.size, "batch": b.batch_size, "gen": b.generate(gen), "ll": b.loglikelihood(ll)}
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow  # a subprocess with 4 host devices compiling both meshes
def test_data_parallel_over_local_devices_matches_one_device(tiny_dir):
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", _DEVICES_SCRIPT, str(tiny_dir)], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-6000:]
    out = json.loads(r.stdout.split("RESULT", 1)[1])
    one, four = out["1"], out["4"]
    assert (one["mesh"], one["batch"], four["mesh"], four["batch"]) == (1, 3, 4, 4)
    assert four["gen"] == one["gen"]
    for (a, ga), (b, gb) in zip(four["ll"], one["ll"]):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb


def test_llava_next_rows_of_different_sizes_match_single_row_generate(tmp_path):
    """Anyres: two images of different aspect ratios in one batch (pixels padded to the maximum crops, their own
    ``image_sizes``) give what ``model.generate`` gives on each row alone."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessor)

    from jaxprune.eval.demo_model import DEMO_CFG, save_demo_tokenizer
    from jaxprune.eval.lmms.backend import Backend
    from jaxprune.eval.lmms.options import parse_model_args
    from jaxprune.eval.lmms.requests import GenRequest, GenSettings, chat_prompt
    from tests.conftest import perturb_

    pins = [[28, 56], [56, 28], [56, 56]]
    tc = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=DEMO_CFG.text.vocab_size, eos_token_id=2, pad_token_id=0,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          image_size=28, patch_size=7)
    cfg = LlavaNextConfig(text_config=tc, vision_config=vc, image_token_index=DEMO_CFG.image_token_index,
                          image_grid_pinpoints=pins, vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(1)
    perturb_(LlavaNextForConditionalGeneration(cfg).eval()).save_pretrained(tmp_path)
    LlavaNextImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                            image_grid_pinpoints=pins).save_pretrained(tmp_path)
    save_demo_tokenizer(tmp_path)
    b = Backend(parse_model_args({"pretrained": str(tmp_path), "batch_size": 2}))
    from PIL import Image

    rng = np.random.default_rng(4)
    ims = [Image.fromarray(rng.integers(0, 256, hw + (3,), dtype=np.uint8)) for hw in [(20, 50), (48, 44)]]
    q = ["what color", "how many square"]
    got = b.generate([GenRequest(t, (im,), GenSettings(4)) for t, im in zip(q, ims)])
    for t, im, text in zip(q, ims, got):
        e = b.encode(0, chat_prompt(t, 1), im, "t")
        ids = b.ctx.model.generate(np.asarray([e.ids]), e.pixels[None], image_sizes=np.asarray([e.hw]),
                                   max_new_tokens=4, eos_token_id=b.ctx.eos_ids, pad_token_id=b.ctx.pad_id)
        assert text == b.decode_text(np.asarray(ids)[0], ())
    assert len({b.encode(0, chat_prompt(t, 1), im, "t").ids.__len__() for t, im in zip(q, ims)}) == 2
