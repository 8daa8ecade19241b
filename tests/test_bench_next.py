"""bench_next runs end to end at a tiny size (full model + one reducer): KV shrinks, sequence shrinks."""

from __future__ import annotations

import jaxprune as jp
from experiments import bench_next


def test_bench_next_rows_tiny():
    cfg = bench_next.next_config(tiny=True)
    model = jp.Llava.random(cfg, seed=0)
    ids, px, sizes, n_tok = bench_next.make_inputs(cfg, 1)
    pre, dec, kv, seq = bench_next.bench_row(model, ids, px, sizes, None, repeats=1)
    full = 5 * cfg.tokens_per_image
    spec = dict((n, s) for n, b, s in bench_next.reducers(cfg, full) if b == 320)["fastervlm"]
    pre2, dec2, kv2, seq2 = bench_next.bench_row(model, ids, px, sizes, spec, repeats=1)
    assert pre > 0 and dec > 0 and pre2 > 0
    assert seq2 < seq and kv2 < kv
