"""jaxprune as an lmms-eval model: ``lmms-eval --model jaxprune --model_args pretrained=DIR,reducer=fastv:64``.

Registration: lmms-eval >= 0.7 reads the entry-point group ``lmms_eval.models``; jaxprune's ``pyproject.toml``
declares ``jaxprune = "jaxprune.eval.lmms:manifest"``, a callable returning an
``lmms_eval.models.registry_v2.ModelManifest`` whose ``simple_class_path`` is
:class:`jaxprune.eval.lmms.model.JaxpruneLMM`. Nothing here imports lmms-eval until lmms-eval calls it.

``--model_args`` (:mod:`.options`): ``pretrained`` (required), ``reducer`` (``NAME:BUDGET`` or ``full``, the
``jaxprune-eval --reducer`` grammar), ``dtype``, ``batch_size``, ``max_new_tokens`` (default when a task sets
none), ``tokenizer``, ``image_mode``, ``num_devices``, ``bucket``.

Devices and hosts: each lmms-eval process runs data-parallel over its local devices (the ``data`` mesh of
``jaxprune-eval``). Several hosts are lmms-eval ranks (``accelerate launch`` / ``torchrun`` with
``--distributed_executor_backend torchrun``; lmms-eval splits the docs by rank and gathers the results), each rank a
single JAX process on its own devices: do not call ``jax.distributed.initialize`` (the model refuses a
multi-process JAX runtime, whose global programs would need every rank to run the same batches).
"""

from __future__ import annotations

from typing import Any

#: the model name on lmms-eval's command line (``--model jaxprune``)
MODEL_ID = "jaxprune"
CLASS_PATH = "jaxprune.eval.lmms.model.JaxpruneLMM"


def manifest() -> Any:
    """The ``lmms_eval.models`` entry point: jaxprune's ``ModelManifest`` (a simple model)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)
