"""``jaxprune-eval`` as a user meets it: --help, argument checks before any model runs (exit status 2, one line
naming the argument), no silent random-weight fallback, and calm output when stderr is not a terminal."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxprune.eval import builtin
from jaxprune.eval.cli import main

ROOT = Path(__file__).resolve().parents[1]
FIX = Path(__file__).resolve().parent / "fixtures" / "benchmarks"
SHIPPED = builtin.SHIPPED_CHECKPOINT


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("JAXPRUNE_CACHE", str(tmp_path_factory.getbasetemp() / "jaxprune-eval-cache"))


@pytest.fixture()
def no_model(monkeypatch):
    """Fail the test if anything loads or runs a model."""
    from jaxprune.eval import sweep

    def refuse(*a, **k):
        raise AssertionError("a model was loaded / run before the arguments were checked")

    monkeypatch.setattr(sweep, "load_model", refuse)
    monkeypatch.setattr(sweep, "run_sweep", refuse)
    monkeypatch.setattr("jaxprune.eval.run_sweep", refuse)


def _one_line_error(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("jaxprune-eval: error: "), err
    return lines[0]


def test_help_lists_benchmarks_reducers_and_layouts(capsys):
    from jaxprune.eval.benchmarks import get_benchmark, list_benchmarks
    from jaxprune.reducers import registry

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in list_benchmarks():
        layout = get_benchmark(name).layout
        assert layout and f"  {name} " in out and layout.split()[0] in out, name   # its question file is named
    assert "llava_pope_test.jsonl" in out and "coco/coco_pope_" in out and "mmbench_dev_20230712.tsv" in out
    assert all(r in out for r in registry.names())
    assert "until its checkpoint is shipped" not in out and "random demo model" not in out
    assert "synthvqa" in out and "jaxprune/eval/synthvqa/checkpoint" in out


@pytest.mark.parametrize("args, flag, words", [
    (["--reducer", "nosuch:4"], "--reducer", "unknown reducer 'nosuch'"),
    (["--reducer", "fastervlm"], "--reducer", "NAME:BUDGET"),
    (["--reducer", "fastervlm:x"], "--reducer", "not an integer"),
    (["--benchmark", "popee", "--data", str(FIX / "pope")], "--benchmark", "unknown benchmark 'popee'"),
    (["--benchmark", "pope", "--data", "/nonexistent/pope"], "--data", "/nonexistent/pope"),
    (["--benchmark", "pope"], "--data", "one --data per --benchmark"),
    (["--no-full", "--benchmark", "pope", "--data", str(FIX / "pope")], "--no-full", "nothing to run"),
])
def test_bad_arguments_exit_2_before_any_model(args, flag, words, no_model, capsys):
    model = [] if "--benchmark" not in args else ["--model", str(SHIPPED)]
    assert main(model + args) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert f"argument {flag}" in line and words in line, line


@pytest.mark.parametrize("args, flag", [(["--batch-size", "0"], "--batch-size"), (["--limit", "-3"], "--limit"),
                                        (["--dtype", "float8"], "--dtype"), (["--bogus"], "--bogus")])
def test_malformed_flags_exit_2_with_one_line(args, flag, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    line = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(line) == 1 and flag in line[0] and line[0].startswith("jaxprune-eval: error:"), line


def test_model_without_config_is_refused(tmp_path, no_model, capsys):
    (tmp_path / "m").mkdir()
    assert main(["--model", str(tmp_path / "m"), "--benchmark", "pope", "--data", str(FIX / "pope")]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "argument --model" in line and "config.json" in line


@pytest.mark.parametrize("model", ["shipped-dir", "default-job"])
def test_impossible_budget_fails_before_any_model(model, no_model, capsys):
    """Before issue 14: ``--reducer fastervlm:100000`` ran the full model first, then failed with status 1."""
    args = ["--reducer", "fastervlm:100000"]
    if model == "shipped-dir":
        args = ["--model", str(SHIPPED), "--benchmark", "pope", "--data", str(FIX / "pope")] + args
    assert main(args) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "argument --reducer" in line and "fastervlm:100000" in line and "100000" in line


def test_missing_shipped_checkpoint_is_an_error_not_random_weights(tmp_path, monkeypatch, no_model, capsys):
    monkeypatch.delenv(builtin.CHECKPOINT_ENV, raising=False)
    monkeypatch.setattr(builtin, "SHIPPED_CHECKPOINT", tmp_path / "site-packages" / "checkpoint")
    monkeypatch.setenv("JAXPRUNE_CACHE", str(tmp_path / "cache"))
    assert main([]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "no checkpoint" in line and str(tmp_path / "site-packages" / "checkpoint") in line
    assert "reinstall jaxprune" in line and builtin.CHECKPOINT_ENV in line
    assert not (tmp_path / "cache").exists()          # nothing was built: the model is checked first
    assert main(["--model", "synthvqa"]) == 2         # named explicitly: the same error
    assert "argument --model" in capsys.readouterr().err
    monkeypatch.setenv(builtin.CHECKPOINT_ENV, str(tmp_path / "elsewhere"))
    assert main([]) == 2
    assert f"${builtin.CHECKPOINT_ENV}" in _one_line_error(capsys.readouterr().err)


def test_progress_bar_only_on_a_terminal(monkeypatch, capsys):
    from jaxprune.eval import runner

    monkeypatch.setattr(runner, "stderr_is_terminal", lambda: True)
    bar = runner._progress(10, "x/full", True)
    assert type(bar).__name__ == "tqdm"
    bar.close()
    monkeypatch.setattr(runner, "stderr_is_terminal", lambda: False)
    line = runner._progress(10, "x/full", True)
    line.update(4)
    line.update(6)
    line.close()
    line.close()
    assert capsys.readouterr().err.count("x/full: 10/10 questions answered in") == 1
    assert type(runner._progress(10, "x/full", False)).__name__ == "_NoBar"


def test_transformers_no_torch_advice_is_dropped():
    from jaxprune.eval._hf import quiet_transformers

    quiet_transformers()
    quiet_transformers()
    log = logging.getLogger("transformers")
    assert sum(type(f).__name__ == "_DropNoTorchAdvice" for f in log.filters) == 1
    # a handler on the logger itself: transformers, once imported (by another test in this worker), stops its
    # logger from propagating to the root logger that caplog listens on
    seen: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = seen.append
    log.addHandler(handler)
    try:
        log.warning("PyTorch was not found. Models won't be available and only tokenizers, configuration and "
                    "file/data utilities can be used.")
        log.warning("another transformers warning")
    finally:
        log.removeHandler(handler)
    assert [r.getMessage() for r in seen] == ["another transformers warning"]


def test_piped_run_prints_status_lines_not_bars(tmp_path_factory):
    """The CLI in a subprocess with stderr a pipe: one line per stage, no bar redraws, no torch advice."""
    cache = tmp_path_factory.getbasetemp() / "jaxprune-eval-cache"   # shared with test_eval_runner
    env = dict(os.environ, JAXPRUNE_CACHE=str(cache), PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get(
        "PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    out = tmp_path_factory.mktemp("piped")
    p = subprocess.run([sys.executable, "-m", "jaxprune.eval.cli", "--model", "demo", "--reducer", "full",
                        "--reducer", "fastervlm:48", "--limit", "8", "--batch-size", "4", "--max-new-tokens", "3",
                        "--bucket", "256", "--no-overlay", "--out", str(out)],
                       env=env, cwd=tmp_path_factory.getbasetemp(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    assert "\r" not in p.stderr and "%|" not in p.stderr and "q/s" not in p.stderr, p.stderr
    assert "PyTorch was not found" not in p.stderr
    lines = p.stderr.splitlines()
    assert len(p.stderr) < 1000 and len(lines) <= 4, p.stderr                 # model, two runs, maybe one note
    assert sum("questions answered in" in x for x in lines) == 2 and lines[0].startswith("model demo ")
    assert "| full | 144 |" in p.stdout and "| fastervlm:48 | 48 |" in p.stdout
