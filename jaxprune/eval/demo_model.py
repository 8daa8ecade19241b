"""The random-weight demo model of ``jaxprune-eval --model demo``: a small LLaVA-1.5-shaped config, a word-level
tokenizer over the words its built-in benchmark uses, and :func:`write_demo_checkpoint` (random weights -> HF
checkpoint with that tokenizer -> converted directory, the real loading path).

Its answers are noise: it exercises the pipeline (and the harness tests), it measures nothing. The default run
uses the trained synthvqa model (:mod:`jaxprune.eval.builtin`); ``experiments/demo.py`` times this model.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from jaxprune.config import LlavaConfig, TextConfig, VisionConfig

DEMO_CFG = LlavaConfig(
    vision=VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                        image_size=96, patch_size=8),
    text=TextConfig(vocab_size=512, hidden_size=96, intermediate_size=192, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=24, eos_token_id=(2,), pad_token_id=0),
    image_token_index=511)

#: Words the demo tokenizer knows (lower-cased): the vicuna_v1 system prompt, the short-answer suffix and the
#: built-in shape benchmark (:mod:`jaxprune.eval.builtin`); anything else maps to ``<unk>``.
DEMO_WORDS: tuple[str, ...] = tuple(dict.fromkeys((
    "a chat between curious user and an artificial intelligence assistant . the gives helpful , detailed polite "
    "answers to ' s questions : answer question using single word or phrase with option letter from given choices "
    "directly is there in image this what how many of color shape square circle red green blue yellow white black "
    "orange purple yes no"
).split()))


def demo_tokenizer():
    """A word-level ``tokenizers.Tokenizer`` matching ``DEMO_CFG`` over :data:`DEMO_WORDS`
    (:func:`jaxprune.eval.wordtok.word_tokenizer`)."""
    from jaxprune.eval.wordtok import word_tokenizer

    return word_tokenizer(DEMO_WORDS, DEMO_CFG.text.vocab_size, DEMO_CFG.image_token_index)


def save_demo_tokenizer(dst: str | Path) -> Path:
    """Write the demo tokenizer as ``tokenizer.json`` + ``tokenizer_config.json`` (loadable with
    ``AutoTokenizer`` / ``PreTrainedTokenizerFast``; pad = ``<unk>`` = id 0 = ``DEMO_CFG.text.pad_token_id``)."""
    from jaxprune.eval.wordtok import save_word_tokenizer

    return save_word_tokenizer(demo_tokenizer(), dst)


def write_demo_checkpoint(dst: str | Path, seed: int = 0) -> Path:
    """The demo model as a converted jaxprune directory with its tokenizer: random weights -> HF safetensors (+
    tokenizer files) -> :func:`jaxprune.checkpoints.convert` -> ``dst`` (which must not exist)."""
    import jaxprune as jp
    from jaxprune.checkpoints import convert, export_hf

    dst = Path(dst)
    with tempfile.TemporaryDirectory(dir=dst.parent if dst.parent.exists() else None) as d:
        tok = save_demo_tokenizer(Path(d) / "tokenizer")
        src = jp.Llava.random(DEMO_CFG, seed=seed)
        export_hf(DEMO_CFG, src.flat_params(), Path(d) / "hf", layout="legacy", support_dir=tok)
        convert(Path(d) / "hf", dst)
    return dst
