"""The one-command training chain of the shipped synthvqa model (experiments/synthvqa/recipe.py)."""

from __future__ import annotations

import json

import pytest

from experiments.synthvqa import recipe
from experiments.synthvqa.train import TrainConfig


def test_every_stage_is_a_valid_config_and_a_command():
    fields = {f for f in TrainConfig.__dataclass_fields__}
    for k, (name, ov) in enumerate(recipe.STAGES, 1):
        assert set(ov) <= fields and "init" not in ov
        TrainConfig(**ov)  # validates types
        cmd = recipe.command(ov, f"W/run{k}", None if k == 1 else f"W/run{k - 1}")
        assert cmd.startswith("python -m experiments.synthvqa.train") and cmd.endswith(f"--out W/run{k}")
        assert ("--init" in cmd) == (k > 1)
    assert recipe.STAGES[-1][1]["scene_style"] == "large"
    assert recipe.log_name(1) == "train_log.json" and recipe.log_name(5) == "train_log_continue4.json"


def test_print_gives_one_command_per_stage(capsys):
    recipe.main(["--work", "W", "--print"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(recipe.STAGES) and "--init W/run1" in lines[1] and "--attn-every-word true" in lines[-1]


def test_unknown_stage_field_is_refused(tmp_path):
    with pytest.raises(ValueError, match="stage bad"):
        recipe.run(tmp_path, None, (("bad", {"n_layers": 3}),))


@pytest.mark.slow
def test_two_tiny_stages_chain_resume_and_export(tmp_path):
    tiny = dict(n_train_images=8, tower_batch=4, batch=4, warmup=1, eval_every=1, n_val_images=4)
    stages = (("a", dict(tiny, tower_steps=1, steps=2)),
              ("b", dict(tiny, tower_steps=0, steps=2, scene_style="large", aug_prob=1.0, aug_object_bias=0.5,
                         aug_evidence="every_object", attn_every_word=True)))
    res = recipe.run(tmp_path / "w", tmp_path / "out", stages)
    assert [e["name"] for e in res["stages"]] == ["a", "b"] and "--init" in res["stages"][1]["command"]
    out = tmp_path / "out"
    assert (out / "model.safetensors").exists() and (out / "train_log.json").exists()
    assert json.loads((out / "synthvqa.json").read_text())["scene_style"] == "large"
    assert json.loads((out / "train_log_continue1.json").read_text())[-1]["event"] == "done"
    again = recipe.run(tmp_path / "w", None, stages)  # resumes: both stages done
    assert all(e.get("skipped") for e in again["stages"])


def test_the_shipped_checkpoint_carries_one_log_per_stage():
    from pathlib import Path

    import jaxprune.eval.synthvqa as sv

    ck = Path(sv.__file__).parent / "checkpoint"
    for k in range(1, len(recipe.STAGES) + 1):
        assert (ck / recipe.log_name(k)).is_file(), f"stage {k} ({recipe.STAGES[k - 1][0]}) has no log in {ck}"
    assert not (ck / recipe.log_name(len(recipe.STAGES) + 1)).exists()
