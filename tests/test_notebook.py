"""``experiments/notebooks/compose_reducers.ipynb`` runs top to bottom (nbclient + an ipykernel), in a fresh cache.

It uses the shipped synthvqa checkpoint; where that is absent (before it is committed) a random-weight stand-in of
the same shapes is written and the notebook pointed at it through ``$JAXPRUNE_SYNTHVQA_CHECKPOINT``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "experiments" / "notebooks" / "compose_reducers.ipynb"


def test_compose_reducers_notebook_runs(tmp_path, monkeypatch):
    from jaxprune.eval import builtin

    monkeypatch.setenv("JAXPRUNE_CACHE", str(tmp_path / "cache"))   # the kernel inherits the environment
    monkeypatch.delenv("MPLBACKEND", raising=False)                  # the kernel's inline backend draws the figures
    if not (builtin.SHIPPED_CHECKPOINT / "config.json").is_file():
        from jaxprune.eval.synthvqa.export import write_standin_checkpoint

        monkeypatch.setenv(builtin.CHECKPOINT_ENV, str(write_standin_checkpoint(tmp_path / "standin")))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT)}})
    client.execute()
    outputs = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "Compose(" in outputs and "visionzip+fastv" in outputs and "chance:" in outputs
    images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
                 for o in c.get("outputs", []))
    assert images == 2  # the kept-token overlays and the accuracy plot
