"""``pyramiddrop_final`` / ``adsc_final``: budget = visual tokens left after the last cut, at any depth."""

import numpy as np
import pytest

import jaxprune as jp
from jaxprune import flops
from jaxprune.reducers import BudgetError, registry
from jaxprune.reducers.compose import as_tuple


def _cfg():
    from jaxprune.eval.synthvqa.export import standin_config

    return standin_config()  # 4 decoder layers, 144 visual tokens: averages below ~37-44 are unreachable


@pytest.mark.parametrize("total,cuts", [(144, 3), (144, 2), (576, 3), (10, 1)])
def test_final_keeps_are_geometric_non_increasing_and_end_at_the_budget(total, cuts):
    for b in range(1, total):
        ks = registry.final_keeps(b, total, cuts)
        assert len(ks) == cuts and ks[-1] == b
        assert all(a >= c for a, c in zip((total, *ks), ks)), (b, ks)
        if cuts > 1 and b < total // 4:
            assert ks[0] == round(total * (b / total) ** (1 / cuts))
    for bad in (0, total, total + 5, 2.5, True):
        with pytest.raises(BudgetError, match="final-token budget"):
            registry.final_keeps(bad, total, cuts)


@pytest.mark.parametrize("name,layers", [("pyramiddrop_final", (1, 2, 3)), ("adsc_final", (1, 2))])
@pytest.mark.parametrize("budget", [48, 32, 16, 8])
def test_final_variants_reach_every_budget_on_a_shallow_decoder(name, layers, budget):
    cfg = _cfg()
    base = name.removesuffix("_final")
    if budget < 40:  # the average-budget form cannot go this low on 4 layers: that is why the variant exists
        with pytest.raises(BudgetError):
            registry.make(base, budget, cfg)
    cuts = as_tuple(registry.make(name, budget, cfg))
    assert tuple(c.layer for c in cuts) == layers
    assert cuts[-1].keep == budget
    cost = flops.prefill_cost(cfg, registry.make(name, budget, cfg), text_tokens=20)
    assert cost.visual_tokens[-1] == budget
    assert budget < cost.average_visual_tokens < 144


def test_final_variants_generate_on_a_batch():
    cfg = _cfg()
    model = jp.Llava.random(cfg, seed=0)
    rng = np.random.default_rng(0)
    ids = np.concatenate([[1, 5, 6], [cfg.image_token_index] * 144, [7, 8, 9]])[None].repeat(2, 0)
    pix = rng.normal(size=(2, 3, 96, 96)).astype(np.float32)
    for name in ("pyramiddrop_final", "adsc_final"):
        out = model.generate(ids, pix, reducer=registry.make(name, 8, cfg), max_new_tokens=3, eos_token_id=-1)
        assert np.asarray(out).shape == (2, 3)
