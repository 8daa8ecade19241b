"""Word-level tokenizers for the small local models (the random demo and the trained synthetic-VQA model).

Ids 0-2 are ``<unk>`` ``<s>`` ``</s>`` (LLaMA's), then ``words`` in order, fillers ``w{i}`` up to the
vocabulary size, and ``<image>`` at ``image_token_index``. Lower-cases, splits on whitespace and
punctuation, prepends ``<s>`` as LLaMA's tokenizer does; ``<image>`` is an added special token, so an
HF-style expanded ``<image><image>...`` splits into one id per copy. Saved as ``tokenizer.json`` +
``tokenizer_config.json`` (loadable with ``AutoTokenizer``; pad = ``<unk>`` = id 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def word_tokenizer(words: Sequence[str], vocab_size: int, image_token_index: int):
    """A ``tokenizers.Tokenizer`` over ``words`` (see the module docstring)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in words:
        vocab.setdefault(w.lower(), len(vocab))
    if len(vocab) > vocab_size - 1 or not (len(vocab) <= image_token_index or image_token_index >= vocab_size):
        raise ValueError(f"{len(vocab)} words do not fit a vocabulary of {vocab_size} with <image> at "
                         f"{image_token_index}")
    for i in range(len(vocab), vocab_size):
        if i != image_token_index:
            vocab[f"w{i}"] = i
    vocab["<image>"] = image_token_index
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>", "<image>"])
    return tok


def save_word_tokenizer(tok, dst: str | Path) -> Path:
    """Write ``tok`` as an HF fast tokenizer folder (bos ``<s>``, eos ``</s>``, unk = pad = ``<unk>``)."""
    from ._hf import quiet_transformers

    quiet_transformers()
    from transformers import PreTrainedTokenizerFast

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<unk>")
    fast.save_pretrained(dst)
    return dst
