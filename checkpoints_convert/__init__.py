"""The checkpoint conversion command line, on top of :mod:`jaxprune.checkpoints`.

``python -m checkpoints_convert SRC DST [--dtype bfloat16] [--force] [--clip-dir DIR]``: a LLaVA checkpoint
(HF in any key layout, original LLaVA, a hub id) -> a jaxprune (orbax) directory;
``python -m checkpoints_convert SRC DST --export-hf [--layout legacy|v5] [--max-shard-size 5GB]``: back to
HF safetensors. The library (reading, writing, key layouts, errors) is :mod:`jaxprune.checkpoints`::

    from jaxprune.checkpoints import convert, export_hf, load_params, read_checkpoint
"""
