"""Reading Hugging Face datasets from local files: parquet shards, a ``datasets`` cache, or a ``save_to_disk`` folder.

The lmms-lab datasets lmms-eval evaluates on (``lmms-lab/POPE``, ``lmms-lab/GQA``, ...) are parquet repositories on the
Hub.  A user holds them in one of three local layouts, all read here with ``pyarrow`` (no network, no ``datasets``
needed):

* **parquet shards**: a download of the repository (``huggingface-cli download --repo-type dataset lmms-lab/POPE
  --local-dir DIR``, or its ``~/.cache/huggingface/hub/datasets--lmms-lab--POPE/snapshots/<rev>/``):
  ``[<config>/|data/]<split>-00000-of-00003.parquet`` (also ``<split>.parquet`` and the Hub's converted layout
  ``<config>/<split>/0000.parquet``);
* **a ``datasets`` cache** (``load_dataset(..., cache_dir=DIR)`` or ``~/.cache/huggingface/datasets``):
  ``<owner>___<name>/<config>/<version>/<hash>/{dataset_info.json, <name>-<split>[-00000-of-00003].arrow}``
  (Arrow IPC streams);
* **a ``save_to_disk`` folder**: ``[dataset_dict.json] <split>/{state.json, data-00000-of-00001.arrow}``.

A *table* is one (config, split) of one layout; its shards are read in shard order.  A shard set with a missing shard
(``-00001-of-00003`` absent) and two copies of one (config, split) are refused, so no row is lost or counted twice.
Errors are :class:`~jaxprune.eval.benchmarks.base.BenchmarkFormatError` naming the file, and the row (0-based, within
that file) and column where one is at fault.

Images are ``datasets.Image`` columns: structs ``{"bytes": binary, "path": string}`` (lists of them for
``Sequence(Image)``).  :func:`image_blob` turns a cell into an :class:`~jaxprune.eval.benchmarks.base.EmbeddedImage`
(the encoded bytes stay encoded in memory until the image is used; a path without bytes is resolved against the
shard's folder).
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .base import BenchmarkFormatError, EmbeddedImage

_SHARD = re.compile(r"^(?P<stem>.+?)-(?P<i>\d{5})-of-(?P<n>\d{5})$")
_NUMBERED = re.compile(r"^\d+$")


@dataclasses.dataclass(frozen=True)
class Table:
    """One (config, split) of a local dataset: its shard files (in order) and their format."""

    config: str | None
    split: str
    files: tuple[Path, ...]
    kind: str                   # "parquet" | "arrow"

    @property
    def where(self) -> str:
        return f"{self.config or 'default'}/{self.split} ({len(self.files)} {self.kind} file(s) under " \
               f"{self.files[0].parent})"


def _shard_key(path: Path) -> tuple[str, int, int]:
    m = _SHARD.match(path.stem)
    return (m["stem"], int(m["i"]), int(m["n"])) if m else (path.stem, 0, 1)


def _parquet_tables(root: Path) -> list[tuple[str | None, str, Path]]:
    out = []
    for p in sorted(root.rglob("*.parquet")):
        if any(part.startswith(".") for part in p.relative_to(root).parts):
            continue
        stem, _, _ = _shard_key(p)
        if _NUMBERED.match(p.stem):          # refs/convert/parquet: <config>/<split>/0000.parquet
            split, config = p.parent.name, (p.parent.parent.name if p.parent != root else None)
        else:
            split = stem
            config = p.parent.name if p.parent != root and p.parent.name != "data" else None
        if config == "default":
            config = None
        out.append((config, split, p))
    return out


def _arrow_tables(root: Path) -> list[tuple[str | None, str, Path]]:
    out = []
    for p in sorted(root.rglob("*.arrow")):
        if any(part.startswith(".") or part.endswith(".incomplete") for part in p.relative_to(root).parts):
            continue
        if p.name.startswith("cache-"):      # datasets' map()/filter() caches, not data
            continue
        state = p.parent / "state.json"
        info = p.parent / "dataset_info.json"
        if state.is_file():                  # save_to_disk: a DatasetDict (split folders) or one Dataset
            if (p.parent.parent / "dataset_dict.json").is_file():
                split, top = p.parent.name, p.parent.parent
            else:
                split, top = _json_field(state, "_split") or p.parent.name, p.parent
            out.append((top.name if top != root else None, str(split), p))
            continue
        config, split = None, None
        if info.is_file():
            data = _json(info)
            config = data.get("config_name")
            prefixes = [str(x) for x in (data.get("dataset_name"), data.get("builder_name")) if x]
            for s in sorted(data.get("splits") or {}, key=len, reverse=True):
                if any(re.match(rf"^{re.escape(b)}-{re.escape(s)}(-\d{{5}}-of-\d{{5}})?$", p.stem) for b in prefixes):
                    split = s
                    break
        if split is None:
            stem = _shard_key(p)[0]
            split = stem.rsplit("-", 1)[-1]
        out.append((None if config in (None, "default") else str(config), str(split), p))
    return out


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BenchmarkFormatError(path, f"unreadable JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def _json_field(path: Path, key: str) -> Any:
    return _json(path).get(key)


def find_tables(root: str | Path) -> list[Table]:
    """Every (config, split) table under ``root`` (parquet and arrow), shards checked for completeness."""
    root = Path(root)
    if not root.is_dir():
        return []
    groups: dict[tuple[str | None, str, str, Path], list[Path]] = {}
    for kind, found in (("parquet", _parquet_tables(root)), ("arrow", _arrow_tables(root))):
        for config, split, p in found:
            groups.setdefault((config, split, kind, p.parent), []).append(p)
    tables = []
    for (config, split, kind, folder), files in sorted(groups.items(), key=lambda kv: (str(kv[0][0]), kv[0][1],
                                                                                      kv[0][2], str(kv[0][3]))):
        files = sorted(files, key=lambda f: (_shard_key(f)[1], f.name))
        counts = {_shard_key(f)[2] for f in files}
        if any(_SHARD.match(f.stem) for f in files):
            n = max(counts)
            have = sorted(_shard_key(f)[1] for f in files)
            if len(counts) > 1 or have != list(range(n)):
                missing = sorted(set(range(n)) - set(have))
                raise BenchmarkFormatError(folder, f"{config or 'default'}/{split}: incomplete or mixed shard set "
                                                   f"(have {[f.name for f in files]}; missing shard(s) {missing} of "
                                                   f"{n})")
        tables.append(Table(config, split, tuple(files), kind))
    return tables


def has_tables(root: str | Path) -> bool:
    """Whether ``root`` holds any parquet / arrow data file (cheap: stops at the first)."""
    root = Path(root)
    if not root.is_dir():
        return False
    for pattern in ("*.parquet", "*.arrow"):
        if next(iter(root.rglob(pattern)), None) is not None:
            return True
    return False


def select_table(root: str | Path, dataset: str, configs: Sequence[str | None], splits: Sequence[str], *,
                 config: str | None = None, split: str | None = None) -> Table:
    """The table of ``dataset`` under ``root``: ``config`` / ``split`` if given, else the first of ``configs`` x
    ``splits`` present (a lone table is taken whatever its names).  Errors list what was found and what was expected."""
    tables = find_tables(root)
    if not tables:
        raise FileNotFoundError(f"{dataset}: no parquet shards, datasets cache or save_to_disk folder under {root}")
    want_cfg = [config] if config is not None else list(configs)
    want_split = [split] if split is not None else list(splits)

    def match(t: Table, c: str | None, s: str) -> bool:
        return (t.config == c or (c is None and t.config is None) or t.config == (c or "default")) and t.split == s

    for c in want_cfg:
        for s in want_split:
            hits = [t for t in tables if match(t, c, s)]
            if len(hits) > 1:
                raise BenchmarkFormatError(root, f"{dataset}: {len(hits)} copies of {c or 'default'}/{s}: "
                                                 + "; ".join(t.where for t in hits)
                                                 + " -- point --data at one of them")
            if hits:
                return hits[0]
    if len(tables) == 1 and config is None and split is None:
        return tables[0]
    found = ", ".join(f"{t.config or 'default'}/{t.split} ({t.kind})" for t in tables)
    expected = ", ".join(f"{c or 'default'}/{s}" for c in want_cfg for s in want_split)
    raise FileNotFoundError(f"{dataset}: under {root} found {found}; expected one of {expected} "
                            f"(pick one with the config= / split= load options)")


def _open_arrow(path: Path) -> Any:
    import pyarrow as pa

    source = pa.memory_map(str(path), "r")
    try:
        return pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
        source = pa.memory_map(str(path), "r")
        return pa.ipc.open_file(source).read_all()


def _schema_names(path: Path, kind: str) -> list[str]:
    import pyarrow.parquet as pq

    if kind == "parquet":
        return list(pq.read_schema(path).names)
    return list(_open_arrow(path).schema.names)


def read_rows(table: Table, required: Sequence[str], optional: Sequence[str] = ()) -> Iterator[tuple[Path, int,
                                                                                                     dict[str, Any]]]:
    """``(file, row, {column: value})`` over every row of every shard, in shard order; only ``required`` (an error
    naming the file when one is absent) and the present ``optional`` columns are read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for path in table.files:
        try:
            names = _schema_names(path, table.kind)
        except (OSError, pa.ArrowException) as e:
            raise BenchmarkFormatError(path, f"not a readable {table.kind} file ({e})") from None
        missing = [c for c in required if c not in names]
        if missing:
            raise BenchmarkFormatError(path, f"lacks column(s) {', '.join(map(repr, missing))} (has: "
                                             f"{', '.join(names)})")
        cols = list(required) + [c for c in optional if c in names and c not in required]
        try:
            if table.kind == "parquet":
                pf = pq.ParquetFile(path)
                batches = pf.iter_batches(columns=cols, batch_size=256)
            else:
                batches = _open_arrow(path).select(cols).to_batches(max_chunksize=256)
            row = 0
            for batch in batches:
                for rec in batch.to_pylist():
                    yield path, row, rec
                    row += 1
        except (OSError, pa.ArrowException) as e:
            raise BenchmarkFormatError(path, f"cannot read rows ({e})") from None


def require(path: Path, row: int, rec: dict[str, Any], column: str, types: type | tuple[type, ...]) -> Any:
    """``rec[column]`` checked to be of ``types`` (never None); else an error naming file, row and column."""
    v = rec.get(column)
    allowed = types if isinstance(types, tuple) else (types,)
    if v is None or not isinstance(v, allowed) or (isinstance(v, bool) and bool not in allowed):
        raise BenchmarkFormatError(path, f"row {row}, column {column!r}: expected "
                                         f"{' or '.join(t.__name__ for t in allowed)}, got {v!r:.80}")
    return v


def image_blob(path: Path, row: int, rec: dict[str, Any], column: str = "image", check: bool = True) -> EmbeddedImage:
    """The image of a ``datasets.Image`` cell (``{"bytes", "path"}``, raw bytes, or a list of them: the middle one),
    decodability checked from its header when ``check``."""
    v = rec.get(column)
    index = None
    if isinstance(v, list):
        if not v:
            raise BenchmarkFormatError(path, f"row {row}, column {column!r}: empty image list")
        index = len(v) // 2
        v = v[index]
    where = f"{path}: row {row}, column {column!r}" + (f"[{index}]" if index is not None else "")
    data = None
    if isinstance(v, dict):
        data = v.get("bytes")
        if data is None and v.get("path"):
            p = Path(v["path"])
            p = p if p.is_absolute() else path.parent / p
            if not p.is_file():
                raise BenchmarkFormatError(path, f"row {row}, column {column!r}: no image bytes and the path "
                                                 f"{v['path']!r} does not exist")
            data = p.read_bytes()
    elif isinstance(v, (bytes, bytearray)):
        data = bytes(v)
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise BenchmarkFormatError(path, f"row {row}, column {column!r}: expected an image "
                                         f"({{'bytes', 'path'}} struct), got {v!r:.80}")
    blob = EmbeddedImage(bytes(data), where)
    if check:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(blob.data)) as img:
                img.size  # noqa: B018 - the header is parsed on open
        except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt files
            raise BenchmarkFormatError(path, f"row {row}, column {column!r}: undecodable image "
                                             f"({type(e).__name__}: {e})") from None
    return blob


def check_unique(seen: dict[Any, tuple[Path, int]], key: Any, path: Path, row: int, what: str) -> None:
    """Refuse a key met twice (a duplicated row across shards), naming both places."""
    if key in seen:
        p0, r0 = seen[key]
        raise BenchmarkFormatError(path, f"row {row}: duplicate {what} {key!r} (also {p0} row {r0})")
    seen[key] = (path, row)


def load_either(root: str | Path, official_files: Sequence[str | Path], official: Any, lmms: Any,
                dataset: str) -> Any:
    """``lmms()`` when ``root`` holds none of ``official_files`` but does hold parquet / arrow data, else
    ``official()``; when neither layout is there the error names both."""
    from .files import find_file

    root = Path(root)
    if find_file(root, [f for f in official_files if f]) is None and has_tables(root):
        return lmms()
    try:
        return official()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}; nor the {dataset} layout (parquet shards, a datasets cache or a save_to_disk "
                                f"folder)") from None
