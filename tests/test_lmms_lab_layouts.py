"""The lmms-lab dataset layouts: each benchmark's fixture (LLaVA / official layout) is re-written as lmms-lab parquet
shards (several shards, one row per row group, the real column names and Arrow types), read back through ``--data``'s
auto-detection, and must give the same questions as the official loader; plus malformed files, the ``datasets`` cache
and ``save_to_disk`` layouts.

Column layouts follow the lmms-eval task code that reads them (EvolvingLMMs-Lab/lmms-eval @ 75571cfe,
``lmms_eval/tasks/<task>/utils.py``: the fields ``doc_to_visual`` / ``doc_to_text`` / ``process_results`` read) and
the dataset cards.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
from PIL import Image  # noqa: E402

from jaxprune.eval.benchmarks import BenchmarkFormatError, get_benchmark  # noqa: E402
from jaxprune.eval.benchmarks import hfdata  # noqa: E402
from jaxprune.eval.benchmarks.base import SHORT_ANSWER_SUFFIX  # noqa: E402

FIX = Path(__file__).resolve().parent / "fixtures" / "benchmarks"
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def png(seed: int, size: tuple[int, int] = (8, 8)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def img(b: bytes, name: str = "x.png") -> dict:
    return {"bytes": b, "path": name}


def write_shards(folder: Path, split: str, rows: list[dict], schema: pa.Schema, n_shards: int = 3) -> list[Path]:
    """``{split}-0000i-of-0000n.parquet`` with uneven shard sizes and one row per row group."""
    folder.mkdir(parents=True, exist_ok=True)
    n_shards = max(1, min(n_shards, len(rows)))
    cuts = [0] + sorted({max(1, len(rows) * (i + 1) // (n_shards + 1) + i // 2) for i in range(n_shards - 1)}) \
        + [len(rows)]
    cuts = sorted(set(min(c, len(rows)) for c in cuts))
    n = len(cuts) - 1
    out = []
    for i in range(n):
        p = folder / f"{split}-{i:05d}-of-{n:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows[cuts[i]:cuts[i + 1]], schema=schema), p, row_group_size=1)
        out.append(p)
    return out


def pixels(q) -> np.ndarray:
    return np.asarray(q.load_image().convert("RGB"))


def same_questions(lmms, official, fields=("question_id", "key", "text", "answers", "category", "split", "options"),
                   meta=()):
    assert len(lmms) == len(official)
    for a, b in zip(lmms, official):
        for f in fields:
            assert getattr(a, f) == getattr(b, f), (f, a.key, getattr(a, f), getattr(b, f))
        for m in meta:
            assert a.metadata.get(m) == b.metadata.get(m), (m, a.key)
        assert a.image_blob is not None and a.image is None
        assert np.array_equal(pixels(a), pixels(b)), a.key


# ---------------------------------------------------------------- per benchmark: the fixture as lmms-lab shards


POPE_SCHEMA = pa.schema([("id", pa.string()), ("question_id", pa.string()), ("question", pa.string()),
                         ("answer", pa.string()), ("image_source", pa.string()), ("image", IMAGE),
                         ("category", pa.string())])


def pope_rows(official):
    return [{"id": str(i), "question_id": str(q.metadata["label_question_id"]),
             "question": q.text[:-len(SHORT_ANSWER_SUFFIX)], "answer": q.answers[0],
             "image_source": Path(q.image).stem, "image": img(q.image_path.read_bytes(), q.image),
             "category": q.category} for i, q in enumerate(official)]


def test_pope_lmms_lab_shards_read_as_the_llava_layout(tmp_path):
    b = get_benchmark("pope")
    official = b.load(FIX / "pope")
    files = write_shards(tmp_path / "POPE" / "data", "test", pope_rows(official), POPE_SCHEMA)
    assert len(files) == 3
    lmms = b.load(tmp_path / "POPE")
    same_questions(lmms, official, meta=("label_question_id",))
    ans = {q.key: "No" if i % 2 else "Yes, there is" for i, q in enumerate(official)}
    assert b.score(lmms, ans) == b.score(official, ans)
    assert b.score(lmms, ans)["scorer"].startswith("LLaVA eval_pope.py")


MME_SCHEMA = pa.schema([("question_id", pa.string()), ("image", IMAGE), ("question", pa.string()),
                        ("answer", pa.string()), ("category", pa.string())])


def test_mme_lmms_lab_shards_read_as_the_llava_layout(tmp_path):
    b = get_benchmark("mme")
    official = b.load(FIX / "mme")
    rows = [{"question_id": q.question_id, "image": img(q.image_path.read_bytes(), q.image),
             "question": q.metadata["mme_question"], "answer": q.answers[0], "category": q.category}
            for q in official]
    write_shards(tmp_path / "MME" / "data", "test", rows, MME_SCHEMA)
    lmms = b.load(tmp_path / "MME")
    same_questions(lmms, official, meta=("mme_question",))
    ans = {q.key: "Yes" for q in official}
    assert b.score(lmms, ans)["per_subtask"] == b.score(official, ans)["per_subtask"]
    # lmms-eval's prompt strips the question first: equal here (no surrounding whitespace)
    assert [q.text for q in b.load(tmp_path / "MME", protocol="lmms_eval")] == [q.text for q in official]


SQA_SCHEMA = pa.schema([("image", IMAGE), ("question", pa.string()), ("choices", pa.list_(pa.string())),
                        ("answer", pa.int8()), ("hint", pa.string()), ("task", pa.string()),
                        ("grade", pa.string()), ("subject", pa.string()), ("topic", pa.string()),
                        ("category", pa.string()), ("skill", pa.string()), ("lecture", pa.string()),
                        ("solution", pa.string())])


def test_scienceqa_img_lmms_lab_shards_read_as_the_official_layout(tmp_path):
    b = get_benchmark("scienceqa")
    official = b.load(FIX / "scienceqa", image_only=True)
    problems = json.loads((FIX / "scienceqa" / "problems.json").read_text())
    rows = []
    for q in official:
        p = problems[str(q.question_id)]
        rows.append({"image": img(q.image_path.read_bytes(), "image.png"), "question": p["question"],
                     "choices": p["choices"], "answer": p["answer"], "hint": p.get("hint") or "",
                     "task": "closed choice", "grade": p.get("grade"), "subject": p.get("subject"),
                     "topic": p.get("topic"), "category": p.get("category"), "skill": p.get("skill"),
                     "lecture": "", "solution": ""})
    write_shards(tmp_path / "ScienceQA" / "ScienceQA-IMG", "test", rows, SQA_SCHEMA, n_shards=2)
    lmms = b.load(tmp_path / "ScienceQA")
    # no problem id in lmms-lab/ScienceQA: ids are row positions, everything else as the official files
    assert [q.question_id for q in lmms] == list(range(len(official)))
    same_questions(lmms, official, fields=("text", "answers", "category", "split", "options", "record_prompt"),
                   meta=("answer_index", "n_choices"))
    ans_off = {q.key: "B" for q in official}
    ans_lmms = {q.key: "B" for q in lmms}
    assert b.score(lmms, ans_lmms)["img_accuracy"] == b.score(official, ans_off)["img_accuracy"]


SEED_SCHEMA = pa.schema([("answer", pa.string()), ("choice_a", pa.string()), ("choice_b", pa.string()),
                         ("choice_c", pa.string()), ("choice_d", pa.string()), ("data_id", pa.string()),
                         ("data_type", pa.string()), ("question", pa.string()), ("question_id", pa.string()),
                         ("question_type_id", pa.int16()), ("image", pa.list_(IMAGE))])


def test_seed_lmms_lab_shards_read_as_the_llava_layout(tmp_path):
    b = get_benchmark("seed")
    official = b.load(FIX / "seed")
    anns = {a["question_id"]: a for a in json.loads((FIX / "seed" / "SEED-Bench.json").read_text())["questions"]}
    rows = []
    for q in official:
        a = anns[str(q.question_id)]
        frames = [img(q.image_path.read_bytes())]
        if a["data_type"] == "video":      # several frames: LLaVA gets the middle one
            frames = [img(png(1)), frames[0], img(png(2))]
        rows.append({**{k: a[k] for k in ("answer", "choice_a", "choice_b", "choice_c", "choice_d", "data_type",
                                          "question", "question_id", "question_type_id")},
                     "data_id": a.get("data_id"), "image": frames})
    write_shards(tmp_path / "SEED-Bench" / "data", "test", rows, SEED_SCHEMA)
    lmms = b.load(tmp_path / "SEED-Bench")
    same_questions(lmms, official, fields=("key", "text", "answers", "category", "split", "options"),
                   meta=("question_type_id", "data_type"))
    ans = {q.key: " a" for q in official}
    assert b.score(lmms, ans, protocol="lmms_eval") == b.score(official, ans, protocol="lmms_eval")


TEXTVQA_SCHEMA = pa.schema([("image_id", pa.string()), ("question_id", pa.int64()), ("question", pa.string()),
                            ("question_tokens", pa.list_(pa.string())), ("image", IMAGE),
                            ("image_width", pa.int64()), ("image_height", pa.int64()),
                            ("flickr_original_url", pa.string()), ("flickr_300k_url", pa.string()),
                            ("answers", pa.list_(pa.string())), ("image_classes", pa.list_(pa.string())),
                            ("set_name", pa.string()), ("ocr_tokens", pa.list_(pa.string()))])


def textvqa_rows():
    anns = json.loads((FIX / "textvqa" / "TextVQA_0.5.1_val.json").read_text())["data"]
    ocr = {d["image_id"]: d["ocr_tokens"] for d in
           json.loads((FIX / "textvqa" / "TextVQA_Rosetta_OCR_v0.2_val.json").read_text())["data"]}
    return [{"image_id": a["image_id"], "question_id": int(a["question_id"]), "question": a["question"],
             "question_tokens": a["question"].split(), "image": img((FIX / "textvqa" / "train_images" /
                                                                    f"{a['image_id']}.png").read_bytes()),
             "image_width": 8, "image_height": 8, "flickr_original_url": "", "flickr_300k_url": "",
             "answers": a["answers"], "image_classes": [], "set_name": "val", "ocr_tokens": ocr[a["image_id"]]}
            for a in anns]


def test_textvqa_lmms_lab_shards_read_as_the_llava_layout(tmp_path):
    b = get_benchmark("textvqa")
    official = b.load(FIX / "textvqa")
    write_shards(tmp_path / "textvqa" / "data", "validation", textvqa_rows(), TEXTVQA_SCHEMA, n_shards=2)
    lmms = b.load(tmp_path / "textvqa")
    # category: LLaVA's file carries a meaningless "default"; the dataset has none
    same_questions(lmms, official, fields=("question_id", "key", "text", "answers", "split", "options"),
                   meta=("question", "textvqa_question_id"))
    ans = {q.key: "Dakota" for q in official}
    assert b.score(lmms, ans) == b.score(official, ans)
    # lmms-eval protocol: no OCR line (its default), on both layouts alike
    lo, oo = b.load(tmp_path / "textvqa", protocol="lmms_eval"), b.load(FIX / "textvqa", protocol="lmms_eval")
    assert [q.text for q in lo] == [q.text for q in oo]
    assert all("Reference OCR" not in q.text and q.text.endswith(SHORT_ANSWER_SUFFIX) for q in lo)
    assert b.score(lo, ans)["scorer"].startswith("lmms-eval") and b.score(lo, ans)["ocr_in_prompt"] == 0.0


VQA_ANSWER = pa.struct([("answer", pa.string()), ("answer_confidence", pa.string()), ("answer_id", pa.int64())])
VQAV2_SCHEMA = pa.schema([("question_type", pa.string()), ("multiple_choice_answer", pa.string()),
                          ("answers", pa.list_(VQA_ANSWER)), ("image_id", pa.int64()), ("answer_type", pa.string()),
                          ("question_id", pa.int64()), ("question", pa.string()), ("image", IMAGE)])


def test_vqav2_lmms_lab_shards_read_as_the_raw_layout(tmp_path):
    b = get_benchmark("vqav2")
    official = b.load(FIX / "vqav2", question_file="v2_OpenEnded_mscoco_val2014_questions.json")
    # the fixture has no val2014 images: give each image id one, for both layouts
    (FIX_COPY := tmp_path / "official").mkdir()
    shutil.copy(FIX / "vqav2" / "v2_OpenEnded_mscoco_val2014_questions.json", FIX_COPY)
    shutil.copy(FIX / "vqav2" / "v2_mscoco_val2014_annotations.json", FIX_COPY)
    (FIX_COPY / "val2014").mkdir()
    for q in official:
        (FIX_COPY / "val2014" / q.image).write_bytes(png(q.metadata["image_id"]))
    official = b.load(FIX_COPY)
    rows = [{"question_type": q.metadata["question_type"], "multiple_choice_answer":
             q.metadata["multiple_choice_answer"], "answers": [{"answer": a, "answer_confidence": "yes",
                                                                "answer_id": i + 1} for i, a in enumerate(q.answers)],
             "image_id": q.metadata["image_id"], "answer_type": q.metadata["answer_type"],
             "question_id": q.question_id, "question": q.metadata["question"],
             "image": img(png(q.metadata["image_id"]))} for q in official]
    write_shards(tmp_path / "VQAv2" / "data", "validation", rows, VQAV2_SCHEMA)
    lmms = b.load(tmp_path / "VQAv2")
    same_questions(lmms, official, meta=("question_type", "answer_type", "image_id"))
    ans = {q.key: t for q, t in zip(official, ("Two", " a frisbee.", "yes\n"))}
    for protocol in ("llava", "vqaeval", "vqaeval_2015", "lmms_eval"):
        assert b.score(lmms, ans, protocol=protocol) == b.score(official, ans, protocol=protocol)
    assert b.score(b.load(tmp_path / "VQAv2", protocol="vqaeval_2015"), ans)["protocol"] == "vqaeval_2015"


GQA_TYPES = pa.struct([("structural", pa.string()), ("semantic", pa.string()), ("detailed", pa.string())])
GQA_SCHEMA = pa.schema([("id", pa.string()), ("imageId", pa.string()), ("question", pa.string()),
                        ("answer", pa.string()), ("fullAnswer", pa.string()), ("isBalanced", pa.bool_()),
                        ("types", GQA_TYPES), ("semanticStr", pa.string())])
GQA_IMAGES = pa.schema([("id", pa.string()), ("image", IMAGE)])


def write_gqa(root: Path, official) -> None:
    raw = json.loads((FIX / "gqa" / "data" / "testdev_balanced_questions.json").read_text())
    rows = [{"id": str(q.question_id), "imageId": raw[str(q.question_id)]["imageId"],
             "question": raw[str(q.question_id)]["question"], "answer": raw[str(q.question_id)]["answer"],
             "fullAnswer": raw[str(q.question_id)].get("fullAnswer"), "isBalanced": True,
             "types": raw[str(q.question_id)]["types"], "semanticStr": ""} for q in official]
    write_shards(root / "testdev_balanced_instructions", "testdev", rows, GQA_SCHEMA, n_shards=2)
    ids = sorted({r["imageId"] for r in rows})
    write_shards(root / "testdev_balanced_images", "testdev",
                 [{"id": i, "image": img((FIX / "gqa" / "data" / "images" / f"{i}.png").read_bytes())} for i in ids],
                 GQA_IMAGES, n_shards=2)


def test_gqa_lmms_lab_instructions_joined_to_images(tmp_path):
    b = get_benchmark("gqa")
    official = b.load(FIX / "gqa")
    write_gqa(tmp_path / "GQA", official)
    lmms = b.load(tmp_path / "GQA")
    same_questions(lmms, official, meta=("structural", "semantic", "is_balanced"))
    ans = {q.key: " Yes." for q in official}
    for protocol in ("llava", "lmms_eval"):
        assert b.score(lmms, ans, protocol=protocol) == b.score(official, ans, protocol=protocol)
    # an instruction whose image is not in the images table
    shutil.rmtree(tmp_path / "GQA" / "testdev_balanced_images")
    write_shards(tmp_path / "GQA" / "testdev_balanced_images", "testdev", [{"id": "nX", "image": img(png(0))}],
                 GQA_IMAGES, n_shards=1)
    with pytest.raises(BenchmarkFormatError, match=r"testdev-0000\d-of-00002.parquet: row 0, column 'imageId'"):
        b.load(tmp_path / "GQA")


MMB_SCHEMA = pa.schema([("index", pa.int64()), ("question", pa.string()), ("hint", pa.string()),
                        ("A", pa.string()), ("B", pa.string()), ("C", pa.string()), ("D", pa.string()),
                        ("answer", pa.string()), ("category", pa.string()), ("image", IMAGE),
                        ("source", pa.string()), ("L2-category", pa.string()), ("comment", pa.string()),
                        ("split", pa.string())])


def test_mmbench_lmms_lab_shards_read_as_the_tsv(tmp_path):
    b = get_benchmark("mmbench")
    official = b.load(FIX / "mmbench")
    rows = [{"index": int(q.question_id), "question": q.metadata["question"], "hint": q.metadata.get("hint"),
             **{c: q.metadata.get(c) for c in "ABCD"}, "answer": q.answers[0] if q.answers else None,
             "category": q.metadata.get("category"), "image": img(base64.b64decode(q.image_b64)),
             "source": q.metadata.get("source"), "L2-category": q.metadata.get("l2-category"),
             "comment": q.metadata.get("comment"), "split": q.metadata.get("split")} for q in official]
    write_shards(tmp_path / "MMBench" / "en", "dev", rows, MMB_SCHEMA)
    write_shards(tmp_path / "MMBench" / "cn", "dev", rows[:1], MMB_SCHEMA, n_shards=1)   # picks en
    lmms = b.load(tmp_path / "MMBench")
    assert all(q.image_b64 is None for q in lmms)
    same_questions(lmms, official, fields=("question_id", "key", "text", "answers", "category", "split", "options",
                                           "record_prompt"), meta=("choices", "l2-category", "hint"))
    ans = {q.key: "B" for q in official}
    assert b.score(lmms, ans) == b.score(official, ans)
    lo, oo = b.load(tmp_path / "MMBench", protocol="lmms_eval"), b.load(FIX / "mmbench", protocol="lmms_eval")
    assert [q.text for q in lo] == [q.text for q in oo]
    q = lo[0]
    assert " There are several options:\nA. " in q.text and q.text.endswith("\n\nAnswer with the option's letter "
                                                                             "from the given choices directly.")


# ---------------------------------------------------------------- layouts, shards, malformed files


def test_datasets_cache_and_save_to_disk_layouts(tmp_path):
    datasets = pytest.importorskip("datasets")
    b = get_benchmark("pope")
    official = b.load(FIX / "pope")
    files = write_shards(tmp_path / "POPE" / "data", "test", pope_rows(official), POPE_SCHEMA)
    ds = datasets.load_dataset("parquet", data_files={"test": [str(f) for f in files]},
                               cache_dir=str(tmp_path / "hf_cache"))
    cached = b.load(tmp_path / "hf_cache")
    same_questions(cached, official)
    ds.save_to_disk(str(tmp_path / "saved"))
    same_questions(b.load(tmp_path / "saved"), official)
    ds["test"].save_to_disk(str(tmp_path / "saved_one"))
    same_questions(b.load(tmp_path / "saved_one"), official)


def test_pope_full_config_alone(tmp_path):
    b = get_benchmark("pope")
    official = b.load(FIX / "pope")
    rows = pope_rows(official)
    for cat in ("popular", "adversarial", "random"):
        write_shards(tmp_path / "POPE" / "Full", cat, [r for r in rows if r["category"] == cat] or rows[:0],
                     POPE_SCHEMA, n_shards=1)
    same_questions(b.load(tmp_path / "POPE"), official, meta=("label_question_id",))


def test_missing_shard_and_duplicated_rows_are_refused(tmp_path):
    b = get_benchmark("pope")
    official = b.load(FIX / "pope")
    files = write_shards(tmp_path / "a", "test", pope_rows(official), POPE_SCHEMA)
    files[1].unlink()
    with pytest.raises(BenchmarkFormatError, match=r"missing shard\(s\) \[1\] of 3"):
        b.load(tmp_path / "a")
    rows = pope_rows(official)
    write_shards(tmp_path / "b", "test", rows + rows[:1], POPE_SCHEMA)
    with pytest.raises(BenchmarkFormatError, match=r"test-00002-of-00003.parquet: row \d+: duplicate"):
        b.load(tmp_path / "b")
    write_shards(tmp_path / "c" / "data", "test", rows, POPE_SCHEMA)
    write_shards(tmp_path / "c" / "copy", "test", rows, POPE_SCHEMA)
    assert len(hfdata.find_tables(tmp_path / "c")) == 2


def test_malformed_rows_name_file_row_and_column(tmp_path):
    b = get_benchmark("pope")
    rows = pope_rows(b.load(FIX / "pope"))
    bad = [dict(r) for r in rows]
    bad[-1]["image"] = {"bytes": b"\x89PNG not really", "path": "x.png"}
    files = write_shards(tmp_path / "img", "test", bad, POPE_SCHEMA)
    with pytest.raises(BenchmarkFormatError, match=rf"{files[-1].name}: row \d+, column 'image': undecodable image"):
        b.load(tmp_path / "img")
    assert b.load(tmp_path / "img", check_images=False)      # checked later, when the image is used
    bad = [dict(r) for r in rows]
    bad[0]["answer"] = None
    write_shards(tmp_path / "null", "test", bad, POPE_SCHEMA)
    with pytest.raises(BenchmarkFormatError, match=r"test-00000-of-00003.parquet: row 0, column 'answer'"):
        b.load(tmp_path / "null")
    schema = pa.schema([f for f in POPE_SCHEMA if f.name != "category"])
    write_shards(tmp_path / "col", "test", [{k: v for k, v in r.items() if k != "category"} for r in rows], schema)
    with pytest.raises(BenchmarkFormatError, match=r"test-00000-of-00003.parquet: lacks column\(s\) 'category'"):
        b.load(tmp_path / "col")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "test.parquet").write_bytes(b"not parquet")
    with pytest.raises(BenchmarkFormatError, match=r"test.parquet: not a readable parquet file"):
        b.load(tmp_path / "junk")


def test_neither_layout_names_both(tmp_path):
    for name, needle in (("pope", "lmms-lab/POPE"), ("gqa", "lmms-lab/GQA"), ("mmbench", "lmms-lab/MMBench"),
                         ("scienceqa", "lmms-lab/ScienceQA"), ("seed", "lmms-lab/SEED-Bench"),
                         ("textvqa", "lmms-lab/textvqa"), ("vqav2", "lmms-lab/VQAv2"), ("mme", "lmms-lab/MME")):
        with pytest.raises(FileNotFoundError, match=needle):
            get_benchmark(name).load(tmp_path)
    write_shards(tmp_path / "x", "train", [{"id": "1", "image": img(png(0))}], GQA_IMAGES, n_shards=1)
    write_shards(tmp_path / "y", "train", [{"id": "1", "image": img(png(0))}], GQA_IMAGES, n_shards=1)
    with pytest.raises(FileNotFoundError, match=r"found x/train \(parquet\), y/train \(parquet\); expected one of "
                                                r"default/test .* or Full/adversarial, Full/random and Full/popular"):
        get_benchmark("pope").load(tmp_path)


def test_generation_length_follows_the_protocol():
    from jaxprune.eval.config import default_max_new_tokens

    assert [default_max_new_tokens(b) for b in ("gqa", "mmbench", "pope")] == [128, 1024, 128]
    assert [default_max_new_tokens(b, "lmms_eval") for b in ("gqa", "mmbench", "pope", "scienceqa")] == [16, 1024,
                                                                                                       128, 16]
    assert default_max_new_tokens("mmvet", "lmms_eval") == 1024


def test_unknown_protocol_is_refused():
    with pytest.raises(ValueError, match="unknown protocol 'vqaeval'"):
        get_benchmark("pope").load(FIX / "pope", protocol="vqaeval")


# ---------------------------------------------------------------- through jaxprune-eval


@pytest.mark.slow
def test_jaxprune_eval_runs_lmms_lab_shards_with_either_protocol(tmp_path, monkeypatch, capsys):
    """The demo model answers POPE from lmms-lab shards, once per protocol; run.json and the report name the scorer,
    and the numbers equal the benchmark's scorer on the recorded answers (the same items in LLaVA's layout)."""
    from jaxprune.eval.cli import main

    monkeypatch.setenv("JAXPRUNE_CACHE", str(tmp_path / "cache"))
    b = get_benchmark("pope")
    official = b.load(FIX / "pope")
    write_shards(tmp_path / "POPE" / "data", "test", pope_rows(official), POPE_SCHEMA)
    for protocol in ("llava", "lmms_eval"):
        out = tmp_path / f"out_{protocol}"
        rc = main(["--model", "demo", "--benchmark", "pope", "--data", str(tmp_path / "POPE"), "--reducer",
                   "fastervlm:16", "--max-new-tokens", "4", "--batch-size", "4", "--out", str(out),
                   "--protocol", protocol, "--no-progress"] + (["--no-overlay"] if protocol == "lmms_eval" else []))
        assert rc == 0
        for run in ("full", "fastervlm_16"):
            rec = json.loads((out / "pope" / run / "run.json").read_text())
            assert rec["n_answered"] == len(official) and rec["score"]["protocol"] == protocol
            assert rec["score"]["scorer"] == b.scorers[protocol]
            texts = {json.loads(line)["key"]: json.loads(line)["text"]
                     for line in (out / "pope" / run / "answers.jsonl").read_text().splitlines()}
            assert rec["headline"] == b.score(official, texts, protocol=protocol)["f1"]
        from jaxprune.eval.report import plotting_available

        if protocol == "llava" and plotting_available():     # overlays drawn from the embedded images
            assert list((out / "overlays").glob("*.png"))
        report = (out / "report.md").read_text()
        assert "## Scorers" in report and b.scorers[protocol] in report
    assert main(["--model", "demo", "--benchmark", "pope", "--data", str(tmp_path / "POPE"), "--protocol",
                 "vqaeval", "--out", str(tmp_path / "x")]) == 2
    assert "not a protocol of benchmark pope" in capsys.readouterr().err


def _write_cache_table(folder: Path, dataset: str, config: str, split: str, rows: list[dict], schema, n: int = 2):
    """A ``datasets`` cache entry as ``load_dataset("lmms-lab/<Name>", config)`` leaves it (Arrow IPC streams named
    ``<dataset>-<split>-0000i-of-0000n.arrow`` + ``dataset_info.json``)."""
    folder.mkdir(parents=True)
    (folder / "dataset_info.json").write_text(json.dumps({
        "builder_name": "parquet", "dataset_name": dataset, "config_name": config,
        "splits": {split: {"name": split, "num_examples": len(rows)}}}))
    step = -(-len(rows) // n)
    for i in range(n):
        with pa.ipc.new_stream(str(folder / f"{dataset}-{split}-{i:05d}-of-{n:05d}.arrow"), schema) as w:
            w.write_table(pa.Table.from_pylist(rows[i * step:(i + 1) * step], schema=schema))


def test_gqa_from_a_datasets_cache_with_both_configs(tmp_path):
    b = get_benchmark("gqa")
    official = b.load(FIX / "gqa")
    write_gqa(tmp_path / "src", official)
    cache = tmp_path / "hf" / "lmms-lab___gqa"
    for config, schema in (("testdev_balanced_instructions", GQA_SCHEMA), ("testdev_balanced_images", GQA_IMAGES)):
        rows = [r for f in sorted((tmp_path / "src" / config).glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
        _write_cache_table(cache / config / "0.0.0" / "0123abcd", "gqa", config, "testdev", rows, schema)
    same_questions(b.load(tmp_path / "hf"), official, meta=("structural", "semantic"))


def _all_lmms_lab_roots(tmp_path: Path) -> dict[str, Path]:
    """Every benchmark's fixture as lmms-lab shards (the layouts of the tests above)."""
    roots = {}
    official = get_benchmark("pope").load(FIX / "pope")
    write_shards(tmp_path / "POPE" / "data", "test", pope_rows(official), POPE_SCHEMA)
    roots["pope"] = tmp_path / "POPE"
    official = get_benchmark("mme").load(FIX / "mme")
    write_shards(tmp_path / "MME" / "data", "test", [
        {"question_id": q.question_id, "image": img(q.image_path.read_bytes()), "question": q.metadata["mme_question"],
         "answer": q.answers[0], "category": q.category} for q in official], MME_SCHEMA)
    roots["mme"] = tmp_path / "MME"
    problems = json.loads((FIX / "scienceqa" / "problems.json").read_text())
    official = get_benchmark("scienceqa").load(FIX / "scienceqa", image_only=True)
    write_shards(tmp_path / "ScienceQA" / "ScienceQA-IMG", "test", [
        {"image": img(q.image_path.read_bytes()), "question": problems[str(q.question_id)]["question"],
         "choices": problems[str(q.question_id)]["choices"], "answer": problems[str(q.question_id)]["answer"],
         "hint": problems[str(q.question_id)].get("hint") or ""} for q in official], SQA_SCHEMA, n_shards=2)
    roots["scienceqa"] = tmp_path / "ScienceQA"
    anns = json.loads((FIX / "seed" / "SEED-Bench.json").read_text())["questions"]
    write_shards(tmp_path / "SEED" / "data", "test", [
        {**{k: a[k] for k in ("answer", "choice_a", "choice_b", "choice_c", "choice_d", "data_type", "question",
                              "question_id", "question_type_id")}, "data_id": a.get("data_id"),
         "image": [img(png(i))]} for i, a in enumerate(anns)], SEED_SCHEMA)
    roots["seed"] = tmp_path / "SEED"
    write_shards(tmp_path / "textvqa" / "data", "validation", textvqa_rows(), TEXTVQA_SCHEMA, n_shards=2)
    roots["textvqa"] = tmp_path / "textvqa"
    official = get_benchmark("vqav2").load(FIX / "vqav2", question_file="v2_OpenEnded_mscoco_val2014_questions.json")
    write_shards(tmp_path / "VQAv2" / "data", "validation", [
        {"question_type": q.metadata["question_type"], "multiple_choice_answer": q.metadata["multiple_choice_answer"],
         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(q.answers)],
         "image_id": q.metadata["image_id"], "answer_type": q.metadata["answer_type"], "question_id": q.question_id,
         "question": q.metadata["question"], "image": img(png(q.metadata["image_id"]))} for q in official],
        VQAV2_SCHEMA)
    roots["vqav2"] = tmp_path / "VQAv2"
    write_gqa(tmp_path / "GQA", get_benchmark("gqa").load(FIX / "gqa"))
    roots["gqa"] = tmp_path / "GQA"
    official = get_benchmark("mmbench").load(FIX / "mmbench")
    write_shards(tmp_path / "MMBench" / "en", "dev", [
        {"index": int(q.question_id), "question": q.metadata["question"], "hint": q.metadata.get("hint"),
         **{c: q.metadata.get(c) for c in "ABCD"}, "answer": q.answers[0] if q.answers else None,
         "category": q.metadata.get("category"), "image": img(base64.b64decode(q.image_b64)),
         "source": q.metadata.get("source"), "L2-category": q.metadata.get("l2-category"),
         "comment": q.metadata.get("comment"), "split": q.metadata.get("split")} for q in official], MMB_SCHEMA)
    roots["mmbench"] = tmp_path / "MMBench"
    return roots


@pytest.mark.slow
def test_jaxprune_eval_answers_every_lmms_lab_benchmark(tmp_path, monkeypatch):
    """One sweep over the eight lmms-lab layouts with the demo model (lmms-eval protocol): every question answered
    from its embedded image, every benchmark scored and its scorer named."""
    from jaxprune.eval.cli import main

    monkeypatch.setenv("JAXPRUNE_CACHE", str(tmp_path / "cache"))
    roots = _all_lmms_lab_roots(tmp_path / "data")
    argv = ["--model", "demo", "--max-new-tokens", "3", "--batch-size", "4", "--out", str(tmp_path / "out"),
            "--protocol", "lmms_eval", "--no-overlay", "--no-progress"]
    for name, root in roots.items():
        argv += ["--benchmark", name, "--data", str(root)]
    assert main(argv) == 0
    for name in roots:
        rec = json.loads((tmp_path / "out" / name / "full" / "run.json").read_text())
        n = len(get_benchmark(name).load(roots[name]))
        assert rec["n_questions"] == rec["n_answered"] == n and not rec["skipped"], name
        assert rec["score"]["protocol"] == "lmms_eval" and rec["score"]["scorer"].startswith("lmms-eval"), name
