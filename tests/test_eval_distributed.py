"""Data-parallel evaluation gives exactly the answers of one device: 8 simulated CPU devices in one process, and
two ``jax.distributed`` processes on 127.0.0.1 (gloo collectives, 2 devices each), through the CLI.

Each configuration runs in fresh subprocesses (the device count is fixed when a JAX backend starts); the
one-device reference runs in the 8-device subprocess with ``--num-devices 1``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNS = ("full", "fastervlm_48")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """(model dir, data root) of the built-in demo model and benchmark, in the session's shared cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("JAXPRUNE_CACHE", str(tmp_path_factory.getbasetemp() / "jaxprune-eval-cache"))
    from jaxprune.eval import builtin

    yield builtin.ensure_model("demo")[0], builtin.ensure_benchmark("shapes")
    mp.undo()


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return env


def _args(inputs, out: Path) -> list[str]:
    model, data = inputs
    return ["--model", str(model), "--benchmark", "pope", "--data", str(data), "--reducer", "fastervlm:48",
            "--batch-size", "8", "--max-new-tokens", "4", "--bucket", "256", "--limit", "12", "--no-overlay",
            "--no-progress", "--out", str(out)]


_TWICE = """
import sys
from jaxprune.eval.cli import main
args = sys.argv[1:]
assert main(args[:-1] + ["--num-devices", "1", "--out", args[-1] + "/one"]) == 0
assert main(args[:-1] + ["--out", args[-1] + "/eight"]) == 0
"""


@pytest.fixture(scope="module")
def one_and_eight(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("dp8")
    args = _args(inputs, out)[:-2] + [str(out)]
    p = subprocess.run([sys.executable, "-c", _TWICE, *args], env=_env(8), cwd=ROOT, capture_output=True,
                       check=False, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    return out / "one", out / "eight"


def _files(out: Path) -> dict[str, bytes]:
    return {r: (out / "pope" / r / "answers.jsonl").read_bytes() for r in RUNS}


def test_eight_devices_match_one_device(one_and_eight):
    import json

    one, eight = one_and_eight
    a, b = _files(one), _files(eight)
    assert a == b
    # 12 questions: two batches of 8, the second with 4 dummy rows
    assert all(len(v.splitlines()) == 12 for v in a.values())
    dev = json.loads((eight / "pope" / "full" / "run.json").read_text())["devices"]
    assert dev.startswith("8 x cpu") and json.loads((one / "pope" / "full" / "run.json").read_text())[
        "devices"].startswith("1 x cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_device(inputs, one_and_eight, tmp_path):
    one, _ = one_and_eight
    out = tmp_path / "two"
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "jaxprune.eval.cli", *_args(inputs, out),
                               "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                              env=_env(2), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    logs = []
    try:
        for p in procs:
            _, e = p.communicate(timeout=900)
            logs.append((p.returncode, e[-3000:]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(rc == 0 for rc, _ in logs), logs
    assert _files(out) == _files(one)
    import json

    rec = json.loads((out / "pope" / "full" / "run.json").read_text())
    assert rec["devices"].startswith("4 x cpu") and "2 process(es)" in rec["devices"]
