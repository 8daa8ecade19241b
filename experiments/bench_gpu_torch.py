"""The transformers side of :mod:`experiments.bench_gpu`: PyTorch LLaVA / LLaVA-NeXT (SDPA attention) timed on
the same device, shapes and dtype as the jaxprune rows.

The model is ``LlavaForConditionalGeneration`` / ``LlavaNextForConditionalGeneration`` built from the same
config (``LlavaConfig.to_hf_dict``) with random weights, created directly on the device in the benchmark dtype
(``torch.set_default_dtype`` + ``with torch.device(...)``: nothing 7B-sized is built on the host),
``attn_implementation='sdpa'``, eval mode, ``torch.inference_mode``, eager (no ``torch.compile``). Jobs, one per
(batch, LLM visual-token count):

* ``full``: TTFT = ``model(input_ids, pixel_values, [image_sizes,] use_cache=True, logits_to_keep=1)``
  (vision tower + projector + packing + LLM prefill + last-token logits; what ``generate`` runs first);
  decode = the slope of a least-squares fit of ``generate(n)``'s time over several ``n`` (greedy,
  ``min_new_tokens`` = ``max_new_tokens``: EOS cannot stop it; HF's default dynamic cache; the prefill is the
  fit's intercept), :func:`experiments.timing.fit_decode`.
* pruned (``visual = v``): TTFT = ``model.model.get_image_features`` on the full image(s) (the whole tower:
  the reducers are pre-/in-LLM, the tower always runs) + the language model prefill on ``inputs_embeds`` of
  ``text + v`` tokens + the LM head on the last token; decode = the same fit of ``generate(n)`` from
  ``inputs_embeds`` of that length. The selection itself is not timed on this side (a lower bound for a
  PyTorch implementation of the reducer). For in-LLM reducers ``v`` is the layer-averaged visual count of the
  jaxprune run, so the decoder's linear FLOPs match (not the attention term exactly).

Times (:mod:`experiments.timing`): one warm-up call per callable, then ``repeats`` ABBA rounds over the job's
callables (TTFT, the vision tower alone, each generate length); CUDA is synchronised inside every timed call.
:mod:`experiments.bench_gpu_pair` instead times the callables of :meth:`TorchSide.prepare` in the same rounds
as jaxprune's.
Peak memory: ``torch.cuda.max_memory_allocated`` over the TTFT runs (reset before), or the process's peak RSS
on CPU (labelled ``host_rss``). Every job catches its own error (recorded, the run goes on) and is appended to
the output JSON-lines file as soon as it is done.

    python -m experiments.bench_gpu_torch --plan PLAN.json --out ROWS.jsonl   # normally started by bench_gpu
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
import traceback

import numpy as np


def _sync(torch, dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def build_model(torch, plan: dict, dev):
    """Random-weight HF model in the plan's dtype, created on ``dev``."""
    import transformers

    d = plan["config"]
    cls_cfg = transformers.LlavaConfig if d["model_type"] == "llava" else transformers.LlavaNextConfig
    cls = (transformers.LlavaForConditionalGeneration if d["model_type"] == "llava"
           else transformers.LlavaNextForConditionalGeneration)
    hf_cfg = cls_cfg.from_dict(d)
    hf_cfg._attn_implementation = "sdpa"
    for sub in (getattr(hf_cfg, "text_config", None), getattr(hf_cfg, "vision_config", None)):
        if sub is not None:
            sub._attn_implementation = "sdpa"
    dtype = getattr(torch, plan["dtype"])
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    torch.manual_seed(0)
    try:
        with torch.device(dev):
            model = cls(hf_cfg)
    finally:
        torch.set_default_dtype(old)
    return model.to(dtype).eval()


def make_inputs(torch, plan: dict, batch: int, dev):
    """The jaxprune benchmark prompt: ``prefix`` text tokens, the image's tokens, ``question`` text tokens."""
    d, rng = plan["config"], np.random.default_rng(0)
    tok, vocab = d["image_token_index"], d["text_config"]["vocab_size"]
    hi = min(vocab, tok) - 1
    ids = np.concatenate([rng.integers(3, hi, (batch, plan["prefix"])),
                          np.full((batch, plan["image_tokens"]), tok),
                          rng.integers(3, hi, (batch, plan["question"]))], axis=1)
    S = d["vision_config"]["image_size"]
    shape = (batch, 3, S, S) if d["model_type"] == "llava" else (batch, plan["crops"], 3, S, S)
    px = rng.standard_normal(shape).astype(np.float32)
    out = {"input_ids": torch.as_tensor(ids, device=dev),
           "attention_mask": torch.ones(ids.shape, dtype=torch.long, device=dev),
           "pixel_values": torch.as_tensor(px, device=dev).to(getattr(torch, plan["dtype"]))}
    if d["model_type"] == "llava_next":
        out["image_sizes"] = torch.as_tensor([plan["image_size_hw"]] * batch, device=dev)
    return out


def _peak(torch, dev) -> tuple[int, str]:
    if dev.type == "cuda":
        return int(torch.cuda.max_memory_allocated(dev)), "cuda_max_allocated"
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(kb) * 1024, "host_rss"


class TorchSide:
    """The transformers model of one plan on its device; :meth:`prepare` gives a job's blocking callables."""

    def __init__(self, plan: dict, emit=None):
        import torch
        import transformers

        self.torch, self.plan = torch, plan
        self.dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.dev.type == "cpu" and plan.get("threads"):
            torch.set_num_threads(int(plan["threads"]))
        self.env = {"torch": torch.__version__, "transformers": transformers.__version__, "device": str(self.dev),
                    "device_name": torch.cuda.get_device_name(self.dev) if self.dev.type == "cuda" else "cpu",
                    "threads": torch.get_num_threads(), "attn_implementation": "sdpa", "dtype": plan["dtype"]}
        if emit:
            emit({"env": self.env})
        t0 = time.perf_counter()
        self.model = build_model(torch, plan, self.dev)
        self.built = {"seconds": time.perf_counter() - t0,
                      "params": int(sum(p.numel() for p in self.model.parameters()))}
        if emit:
            emit({"built": self.built})
        self.inputs: dict = {}

    def blocking(self, fn):
        torch, dev = self.torch, self.dev

        def f():
            with torch.inference_mode():
                fn()
            _sync(torch, dev)
        return f

    def prepare(self, job: dict, lengths: list[int]) -> dict:
        """``{"ttft": fn, "vision": fn, ["llm": fn,] "decode": {n: fn}, "seq": int}`` of one job."""
        torch, plan, model, dev = self.torch, self.plan, self.model, self.dev
        if job["batch"] not in self.inputs:
            self.inputs.clear()
            self.inputs[job["batch"]] = make_inputs(torch, plan, job["batch"], dev)
        inputs = self.inputs[job["batch"]]
        batch = inputs["input_ids"].shape[0]
        gen_kw = {"do_sample": False, "pad_token_id": 0}
        vis_kw = {"pixel_values": inputs["pixel_values"]}
        if "image_sizes" in inputs:
            vis_kw["image_sizes"] = inputs["image_sizes"]

        def vision():
            return model.model.get_image_features(**vis_kw)

        out = {"vision": self.blocking(vision)}
        if job["visual"] is None:  # the full model, HF's own path
            def ttft():
                return model(**inputs, use_cache=True, logits_to_keep=1).logits

            def gen(n):
                return lambda: model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, **gen_kw)
            seq = inputs["input_ids"].shape[1]
        else:
            seq = plan["prefix"] + plan["question"] + int(job["visual"])
            g = torch.Generator(device="cpu").manual_seed(1)
            hi = min(plan["config"]["text_config"]["vocab_size"], plan["config"]["image_token_index"])
            ids = torch.randint(3, hi, (batch, seq), generator=g).to(dev)
            with torch.inference_mode():
                emb = model.get_input_embeddings()(ids)
            mask = torch.ones((batch, seq), dtype=torch.long, device=dev)
            lm, head = model.model.language_model, model.lm_head

            def llm():
                h = lm(inputs_embeds=emb, attention_mask=mask, use_cache=True).last_hidden_state
                return head(h[:, -1:])

            def ttft():
                vision()
                return llm()

            def gen(n):
                return lambda: model.generate(inputs_embeds=emb, attention_mask=mask, max_new_tokens=n,
                                              min_new_tokens=n, **gen_kw)
            out["llm"] = self.blocking(llm)
        out.update(ttft=self.blocking(ttft), decode={n: self.blocking(gen(n)) for n in lengths}, seq=int(seq),
                   batch=int(batch))
        return out

    def peak(self) -> tuple[int, str]:
        torch, dev = self.torch, self.dev
        if dev.type == "cuda":
            return int(torch.cuda.max_memory_allocated(dev)), "cuda_max_allocated"
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(kb) * 1024, "host_rss"


def measure_job(side: TorchSide, job: dict, lengths: list[int], repeats: int) -> dict:
    """A job timed alone: TTFT, the vision tower (and the pruned LLM prefill) and each generate length in the
    same ABBA rounds; decode from the fit."""
    from experiments import timing as T

    prep = side.prepare(job, lengths)
    if side.dev.type == "cuda":
        side.torch.cuda.reset_peak_memory_stats(side.dev)
    fns = {"ttft": prep["ttft"], "vision": prep["vision"], **({"llm": prep["llm"]} if "llm" in prep else {}),
           **{("decode", n): f for n, f in prep["decode"].items()}}
    res = T.interleaved(fns, repeats)
    out = {"seq": prep["seq"], "ttft_s": res["ttft"].median, "ttft": res["ttft"].to_dict(),
           "vision_s": res["vision"].median}
    if "llm" in prep:
        out["llm_prefill_s"] = res["llm"].median
    if lengths:
        fit = T.fit_decode({n: res[("decode", n)].samples for n in lengths})
        out.update(decode_fit=fit.to_dict(), decode_s_per_tok=fit.per_token_s)
    else:
        out.update(decode_fit=None, decode_s_per_tok=None)
    out["tokens_per_s"] = prep["batch"] / out["decode_s_per_tok"] if out["decode_s_per_tok"] else None
    out["peak_bytes"], out["peak_kind"] = side.peak()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", required=True, help="JSON plan written by experiments.bench_gpu")
    ap.add_argument("--out", required=True, help="JSON-lines file to append results to")
    a = ap.parse_args(argv)
    with open(a.plan) as f:
        plan = json.load(f)

    def emit(rec: dict) -> None:
        with open(a.out, "a") as f:
            f.write(json.dumps(rec, default=str) + "\n")

    try:
        side = TorchSide(plan, emit)
    except Exception as e:  # noqa: BLE001 - recorded for every job, the jax side keeps its figures
        err = f"building the transformers model failed: {type(e).__name__}: {e}"
        traceback.print_exc()
        for job in plan["jobs"]:
            emit({"key": job["key"], "error": err})
        return 0
    deadline = plan.get("deadline")
    for job in plan["jobs"]:
        rec = {"key": job["key"], "batch": job["batch"], "visual": job["visual"]}
        if deadline is not None and time.time() > deadline and job["visual"] is not None:  # full jobs always run
            rec["skipped"] = "time budget (--deadline) spent before this job"
            emit(rec)
            continue
        try:
            rec.update(measure_job(side, job, job.get("lengths", []), plan["repeats"]))
        except Exception as e:  # noqa: BLE001 - one failing job is recorded, the run goes on
            rec["error"] = f"{type(e).__name__}: {str(e)[:400]}"
            traceback.print_exc()
            if side.dev.type == "cuda":
                side.torch.cuda.empty_cache()
        emit(rec)
        print(json.dumps({k: v for k, v in rec.items() if k not in ("ttft", "decode_fit")}, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
