"""The engine: one prefill / decode path for every model family.

    p = jaxprune.engine.plan(model, input_ids, pixel_values, attention_mask, image_sizes, reducer=r)
    out = jaxprune.engine.forward(model, p)                  # logits [B, T_out, V]
    state = jaxprune.engine.prefill(model, p, max_new_tokens=32)
    tokens = jaxprune.engine.decode(model, state, 32, eos_ids=(2,), pad_id=0)

``plan`` validates on the host and fixes the static layout; ``model.programs`` holds the jitted programs
(``.lower(params, p.arrays, static=p.static, ...)`` for ahead-of-time compilation).
"""

from jaxprune.engine.decoder import DecodeState
from jaxprune.engine.plan import EngineStatic, Plan, plan, split_reducer, validate_reducer
from jaxprune.engine.run import LlavaOutput, Programs, decode, encode, forward, prefill

__all__ = ["DecodeState", "EngineStatic", "LlavaOutput", "Plan", "Programs", "decode", "encode", "forward", "plan",
           "prefill", "split_reducer", "validate_reducer"]
