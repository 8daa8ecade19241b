"""The LLM stage: running the decoder with reducers that cut the sequence after chosen layers.

Without LLM-stage reducers this is the plain decoder. In-LLM reducers (FastV, PyramidDrop,
VisionDrop stage B, ADSC, DART) plug in through :func:`run_llm` / :func:`prefill_llm`.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxprune import generate as gen
from jaxprune.models.llava import LlavaModule


def check_llm_reducers(cfg, reducers: tuple, batch, imgs_per_row: int, visual_per_image: int) -> None:
    """Host-side validation of LLM-stage reducers against the batch (layers, budgets)."""
    llm = [r for r in reducers if r.stage == "llm"]
    if llm:
        raise NotImplementedError(
            f"{type(llm[0]).__name__}: LLM-stage reducers are not available in this version of jaxprune")


def run_llm(m: LlavaModule, llm_reducers: list, h, positions, valid):
    """Logits ``[B, T, V]`` and the final validity mask of the (possibly cut) sequence."""
    return gen.full_logits(m, h, positions, valid), valid


def prefill_llm(m: LlavaModule, llm_reducers: list, h, positions, valid, max_new_tokens: int) -> gen.DecodeState:
    return gen.prefill(m, h, positions, valid, max_new_tokens)


def forward_llm_only(model, batch, reducers):  # text-only / LLM-only reducer paths
    raise NotImplementedError("LLM-stage reducers are not available in this version of jaxprune")


def prefill_llm_only(model, batch, reducers, max_new_tokens):
    raise NotImplementedError("LLM-stage reducers are not available in this version of jaxprune")
