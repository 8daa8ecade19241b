"""Where a checkpoint comes from: a local directory, or a Hugging Face hub id the user named.

:func:`resolve_source` never touches the network for an existing local path; only a string that is
not a local path and looks like ``owner/name`` (optionally ``@revision``) is downloaded, with
``huggingface_hub.snapshot_download`` restricted to configs, weights (safetensors, or ``.bin`` when
the repository has no safetensors) and tokenizer / processor files.

:func:`open_tensors` opens the tensor files of a directory (safetensors preferred, PyTorch ``.bin``
as a fallback), and :func:`copy_support_files` copies the tokenizer, processor and generation files
that travel with a converted checkpoint. :func:`atomic_dir` writes a destination directory all at
once (a temporary sibling renamed into place), for conversion and export alike.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from jaxprune.checkpoints.errors import CheckpointError, CheckpointFileError, DestinationExistsError
from jaxprune.checkpoints.safetensors_io import INDEX_NAME, SafetensorsCheckpoint
from jaxprune.checkpoints.torch_bin import TorchBinCheckpoint, has_bin_checkpoint

#: Files copied next to a converted checkpoint when the source has them.
SUPPORT_FILES: tuple[str, ...] = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
    "processor_config.json", "generation_config.json",
)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")
_META_PATTERNS = ["config.json", *SUPPORT_FILES]


def is_hub_id(src: str) -> bool:
    """Whether ``src`` has the shape of a hub repository id (``owner/name[@revision]``)."""
    return bool(_HUB_ID.fullmatch(src)) and ".." not in src


def _download(repo: str) -> Path:
    repo_id, _, revision = repo.partition("@")
    try:
        from huggingface_hub import list_repo_files, snapshot_download

        files = list_repo_files(repo_id, revision=revision or None)
        if any(f.endswith(".safetensors") for f in files):
            weights = ["*.safetensors", INDEX_NAME]
        else:
            weights = ["*.bin", "pytorch_model.bin.index.json"]
        path = snapshot_download(repo_id, revision=revision or None, allow_patterns=_META_PATTERNS + weights)
    except Exception as e:  # network, auth, missing repo: all user-facing
        raise CheckpointError(f"cannot download {repo!r} from the Hugging Face hub: {type(e).__name__}: {e}") from None
    return Path(path)


def resolve_source(src: str | os.PathLike) -> Path:
    """A local checkpoint directory, downloading ``src`` from the hub only if it is a hub id and no local path."""
    p = Path(src).expanduser()
    if p.exists():
        if not p.is_dir():
            raise CheckpointError(f"{p} is not a directory (expected a checkpoint directory with config.json)")
        return p
    if isinstance(src, str) and is_hub_id(src):
        return _download(src)
    raise CheckpointError(f"{src}: no such directory (and not a Hugging Face hub id)")


def open_tensors(directory: Path) -> SafetensorsCheckpoint | TorchBinCheckpoint:
    """The tensor files of ``directory``: safetensors if any, else PyTorch ``.bin``."""
    if (directory / INDEX_NAME).is_file() or any(directory.glob("*.safetensors")):
        return SafetensorsCheckpoint(directory)
    if has_bin_checkpoint(directory):
        return TorchBinCheckpoint(directory)
    raise CheckpointFileError(f"{directory}: no model weights (*.safetensors, {INDEX_NAME} or pytorch_model.bin)")


def copy_support_files(dst: Path, *sources: Path | None) -> list[str]:
    """Copy :data:`SUPPORT_FILES` into ``dst``; for each file the first source that has it wins."""
    copied = []
    for name in SUPPORT_FILES:
        for s in sources:
            if s is not None and (s / name).is_file():
                shutil.copyfile(s / name, dst / name)
                copied.append(name)
                break
    return copied


@contextlib.contextmanager
def atomic_dir(dst: Path, force: bool) -> Iterator[Path]:
    """Yield a temp directory next to ``dst``; on success it replaces ``dst``, on failure it is removed."""
    if dst.exists() and not force:
        raise DestinationExistsError(f"{dst} already exists (use --force / force=True to overwrite)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = dst.parent / f".{dst.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        if dst.exists():
            trash = dst.parent / f".{dst.name}.old-{tag}"
            os.replace(dst, trash)
            os.replace(tmp, dst)
            shutil.rmtree(trash, ignore_errors=True) if trash.is_dir() else trash.unlink()
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
