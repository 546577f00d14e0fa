import json
import os
import shutil
import sys

import numpy as np
import pytest

from hybridlm.data import TokenDataset, Tokenizer, prepare_dataset
from hybridlm.data.prepare import find_forced_held_out_key, held_out_score, is_held_out, token_dtype
from hybridlm.data.sources import collect_pieces, iter_documents
from hybridlm.data.tokenizer import file_sha256


def expected_streams(corpus, tokenizer: Tokenizer, val_fraction: float, forced_key=None) -> dict:
    """Each split's token stream and document starts, computed document by document, the slow obvious way."""
    documents = []
    for path in sorted(p for p in corpus.rglob("*") if p.is_file() and ".hidden" not in p.parts):
        key = path.relative_to(corpus).as_posix()
        if path.suffix in (".txt", ".md", ".py"):
            documents.append((key, path.read_text(encoding="utf-8")))
        elif path.suffix == ".jsonl":
            offset = 0
            for line in path.read_bytes().splitlines(keepends=True):
                if line.strip():
                    documents.append((f"{key}@{offset}", json.loads(line)["text"]))
                offset += len(line)
    streams = {"train": ([], [], 0), "val": ([], [], 0)}
    for key, text in documents:
        split = "val" if is_held_out(key, val_fraction, forced_key) else "train"
        tokens, starts, n_bytes = streams[split]
        starts.append(len(tokens))
        tokens.extend(tokenizer.encode(text) + [tokenizer.eos_token_id])
        streams[split] = (tokens, starts, n_bytes + len(text.encode("utf-8")))
    return streams


def read_all(dataset: TokenDataset, split: str) -> np.ndarray:
    part = dataset.split(split)
    return part.read(0, part.n_tokens)


def test_prepare_matches_tokenizer_output(corpus, tiny_tokenizer, tmp_path):
    out = prepare_dataset([corpus], tiny_tokenizer, tmp_path / "ds", val_fraction=0.25, workers=2,
                          shard_bytes=300, progress=False)
    tokenizer = Tokenizer(tiny_tokenizer)
    dataset = TokenDataset(out)
    expected = expected_streams(corpus, tokenizer, 0.25)
    assert len(dataset.meta["splits"]["train"]["shards"]) > 3  # several units, so reads cross shards
    for split, (tokens, starts, n_bytes) in expected.items():
        assert len(starts) > 2
        part = dataset.split(split)
        np.testing.assert_array_equal(read_all(dataset, split), tokens)
        np.testing.assert_array_equal(part.document_starts(), starts)
        assert (part.n_tokens, part.n_documents, part.n_bytes) == (len(tokens), len(starts), n_bytes)
        # Exact bits-per-byte bookkeeping: the tokens' byte lengths add up to the text's UTF-8 bytes.
        assert int(tokenizer.token_byte_lengths[read_all(dataset, split)].sum()) == n_bytes

    meta = json.loads((out / "meta.json").read_text())
    assert meta["format_version"] == 1 and meta["dtype"] == "uint16" == dataset.dtype.name
    assert meta["vocab_size"] == tokenizer.vocab_size and meta["eos_id"] == 0
    assert meta["tokenizer"]["sha256"] == file_sha256(tiny_tokenizer) == file_sha256(out / "tokenizer.json")
    assert meta["tokenizer"]["path"] == "tokenizer.json" and meta["tokenizer"]["eos_token"] == "<|endoftext|>"
    for split, info in meta["splits"].items():
        assert info["n_tokens"] == sum(shard["n_tokens"] for shard in info["shards"])
        assert info["n_documents"] == sum(shard["n_documents"] for shard in info["shards"])
        assert info["n_bytes"] == sum(shard["n_bytes"] for shard in info["shards"])
    assert not list(out.rglob("*.tmp-*"))


def test_split_is_by_document_key_and_deterministic(corpus, tiny_tokenizer, tmp_path):
    """The held-out split depends only on document keys: a moved copy of the corpus splits the same way."""
    moved = shutil.copytree(corpus, tmp_path / "elsewhere" / "copy")
    first = prepare_dataset([corpus], tiny_tokenizer, tmp_path / "a", val_fraction=0.3, workers=1, progress=False)
    second = prepare_dataset([moved], tiny_tokenizer, tmp_path / "b", val_fraction=0.3, workers=2, progress=False)
    for split in ("train", "val"):
        np.testing.assert_array_equal(read_all(TokenDataset(first), split), read_all(TokenDataset(second), split))
    assert 0.0 <= held_out_score("doc000.txt") < 1.0
    scores = [held_out_score(f"doc{i}") for i in range(2000)]
    assert 0.4 < np.mean(scores) < 0.6 and len(set(scores)) == 2000


def test_at_least_one_document_is_held_out(corpus, tiny_tokenizer, tmp_path):
    pieces = collect_pieces([corpus])
    keys = [key for key, _ in iter_documents(pieces)]
    forced = find_forced_held_out_key(pieces, 1e-12)
    assert forced == min(keys, key=held_out_score)
    out = prepare_dataset([corpus], tiny_tokenizer, tmp_path / "ds", val_fraction=1e-12, progress=False)
    dataset = TokenDataset(out)
    assert dataset.meta["forced_held_out_key"] == forced
    assert dataset.split("val").n_documents == 1
    assert dataset.split("train").n_documents == len(keys) - 1
    tokens, _, _ = expected_streams(corpus, Tokenizer(tiny_tokenizer), 1e-12, forced)["val"]
    np.testing.assert_array_equal(read_all(dataset, "val"), tokens)


def test_rerun_is_idempotent_and_redoes_only_unfinished_units(corpus, tiny_tokenizer, tmp_path):
    out = prepare_dataset([corpus], tiny_tokenizer, tmp_path / "ds", val_fraction=0.25, shard_bytes=300,
                          workers=1, progress=False)
    before = {split: read_all(TokenDataset(out), split) for split in ("train", "val")}
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != ".lock")
    mtimes = {p: p.stat().st_mtime_ns for p in files}

    prepare_dataset([corpus], tiny_tokenizer, out, val_fraction=0.25, shard_bytes=300, workers=2, progress=False)
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes  # nothing rewritten

    # Simulate a crash inside unit 2: its manifest never got renamed into place, its token file was
    # cut short, and a half-written temporary is lying around. meta.json was never written.
    manifest = json.loads((out / "shards" / "00002.json").read_text())
    (out / "shards" / "00002.json").unlink()
    (out / "meta.json").unlink()
    broken = out / next(iter(manifest["shards"].values()))["tokens"]
    broken.write_bytes(broken.read_bytes()[:3])
    leftover = out / "train" / "00002.bin.tmp-99999"
    leftover.write_bytes(b"\x01\x02\x03")
    # And unit 3 has a manifest but a token file of the wrong size (e.g. the disk filled up).
    manifest3 = json.loads((out / "shards" / "00003.json").read_text())
    (out / next(iter(manifest3["shards"].values()))["tokens"]).write_bytes(b"\x00\x00")

    prepare_dataset([corpus], tiny_tokenizer, out, val_fraction=0.25, shard_bytes=300, workers=2, progress=False)
    for split in ("train", "val"):
        np.testing.assert_array_equal(read_all(TokenDataset(out), split), before[split])
    assert not leftover.exists()
    redone_units = {"00002", "00003"}
    for path in files:
        unit = path.name.split(".")[0]
        if unit not in redone_units and path.name not in ("meta.json", "documents.npy"):
            assert path.stat().st_mtime_ns == mtimes[path], f"{path} was rewritten"


def test_rerun_repairs_a_shard_lost_after_preparation(corpus, tiny_tokenizer, tmp_path):
    out = prepare_dataset([corpus], tiny_tokenizer, tmp_path / "ds", val_fraction=0.25, shard_bytes=300, progress=False)
    before = read_all(TokenDataset(out), "train")
    lost = out / TokenDataset(out).meta["splits"]["train"]["shards"][1]["tokens"]
    lost.unlink()
    with pytest.raises(ValueError, match="missing.*incomplete.*hybridlm data prepare"):
        TokenDataset(out).split("train")
    prepare_dataset([corpus], tiny_tokenizer, out, val_fraction=0.25, shard_bytes=300, progress=False)
    np.testing.assert_array_equal(read_all(TokenDataset(out), "train"), before)


def test_settings_change_on_existing_dataset_is_refused(corpus, tiny_tokenizer, tmp_path):
    out = prepare_dataset([corpus], tiny_tokenizer, tmp_path / "ds", val_fraction=0.25, progress=False)
    with pytest.raises(ValueError, match="other settings.*val_fraction"):
        prepare_dataset([corpus], tiny_tokenizer, out, val_fraction=0.5, progress=False)


def test_added_documents_update_the_dataset(corpus, tiny_tokenizer, tmp_path):
    out = prepare_dataset([corpus], tiny_tokenizer, tmp_path / "ds", val_fraction=0.25, progress=False)
    (corpus / "zzz_new.txt").write_text("a brand new document")
    prepare_dataset([corpus], tiny_tokenizer, out, val_fraction=0.25, progress=False)
    expected = expected_streams(corpus, Tokenizer(tiny_tokenizer), 0.25)
    for split in ("train", "val"):
        np.testing.assert_array_equal(read_all(TokenDataset(out), split), expected[split][0])


def test_jsonl_pieces_cover_every_line_once(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [json.dumps({"text": f"document {i} " + "x" * (i % 13)}) for i in range(40)]
    path.write_text("\n".join(lines[:20]) + "\n\n" + "\n".join(lines[20:]) + "\n")
    expected = [json.loads(line)["text"] for line in lines]
    for piece_bytes in (1, 7, 31, 64, 100, 10_000):
        pieces = collect_pieces([path], piece_bytes=piece_bytes)
        assert len(pieces) == -(-path.stat().st_size // piece_bytes)
        assert [text for _, text in iter_documents(pieces)] == expected


def test_uint32_for_large_vocabularies(tmp_path):
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    words = [f"w{i}" for i in range(70_000)]
    spec = {
        "version": "1.0", "truncation": None, "padding": None, "normalizer": None, "post_processor": None,
        "added_tokens": [{"id": 70_000, "content": "</s>", "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True}],
        "pre_tokenizer": {"type": "WhitespaceSplit"}, "decoder": None,
        "model": {"type": "WordLevel", "vocab": {**{w: i for i, w in enumerate(words)}, "</s>": 70_000},
                  "unk_token": "w0"},
    }
    (tmp_path / "big.json").write_text(json.dumps(spec))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("w1 w69999 w5")
    (corpus / "b.txt").write_text("w65536 w2")
    out = prepare_dataset([corpus], tmp_path / "big.json", tmp_path / "ds", val_fraction=0.5, progress=False)
    dataset = TokenDataset(out)
    assert dataset.dtype == np.uint32 and dataset.eos_id == 70_000
    streams = sorted([read_all(dataset, "train").tolist(), read_all(dataset, "val").tolist()])
    assert streams == sorted([[1, 69999, 5, 70_000], [65536, 2, 70_000]])


def test_bad_inputs(tmp_path, tiny_tokenizer):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.bin").write_bytes(b"\x00")
    with pytest.raises(ValueError, match="found no documents"):
        prepare_dataset([empty], tiny_tokenizer, tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare_dataset([tmp_path / "missing"], tiny_tokenizer, tmp_path / "out", progress=False)
    (tmp_path / "weird.csv").write_text("a,b")
    with pytest.raises(ValueError, match="unsupported type"):
        prepare_dataset([tmp_path / "weird.csv"], tiny_tokenizer, tmp_path / "out", progress=False)

    no_text = tmp_path / "no_text.jsonl"
    no_text.write_text('{"text": "fine"}\n{"content": "wrong field"}\n')
    with pytest.raises(ValueError, match="no string field 'text'.*content"):
        prepare_dataset([no_text], tiny_tokenizer, tmp_path / "out1", progress=False)
    not_json = tmp_path / "broken.jsonl"
    not_json.write_text('{"text": "fine"}\n{"text": unquoted}\n')
    with pytest.raises(ValueError, match="not valid JSON"):
        prepare_dataset([not_json], tiny_tokenizer, tmp_path / "out2", progress=False)

    one = tmp_path / "one"
    one.mkdir()
    (one / "only.txt").write_text("a single document cannot be split")
    with pytest.raises(ValueError, match="every document of the sources was held out"):
        prepare_dataset([one], tiny_tokenizer, tmp_path / "out3", progress=False)
    only_empty = tmp_path / "only_empty"
    only_empty.mkdir()
    (only_empty / "blank.txt").write_text("")
    with pytest.raises(ValueError, match="no non-empty document"):
        prepare_dataset([only_empty], tiny_tokenizer, tmp_path / "out4", progress=False)
    for fraction in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="val_fraction"):
            prepare_dataset([one], tiny_tokenizer, tmp_path / "out5", val_fraction=fraction, progress=False)


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, tiny_tokenizer, monkeypatch):
    (tmp_path / "data.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match="pip install pyarrow"):
        prepare_dataset([tmp_path / "data.parquet"], tiny_tokenizer, tmp_path / "out", progress=False)


def test_parquet_source(tmp_path, tiny_tokenizer):
    pyarrow = pytest.importorskip("pyarrow")  # optional dependency
    import pyarrow.parquet as parquet

    texts = [f"row {i} of the table" for i in range(50)]
    table = pyarrow.table({"text": texts, "other": list(range(50))})
    parquet.write_table(table, tmp_path / "data.parquet", row_group_size=7)
    pieces = collect_pieces([tmp_path / "data.parquet"], piece_bytes=1)
    assert len(pieces) == 8
    expected = [(f"data.parquet#{i}", text) for i, text in enumerate(texts)]
    assert list(iter_documents(pieces)) == expected
    out = prepare_dataset([tmp_path / "data.parquet"], tiny_tokenizer, tmp_path / "ds", val_fraction=0.2,
                          shard_bytes=1, workers=2, progress=False)
    dataset = TokenDataset(out)
    assert dataset.split("train").n_documents + dataset.split("val").n_documents == 50
    parquet.write_table(pyarrow.table({"body": texts}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="no 'text' column"):
        prepare_dataset([tmp_path / "bad.parquet"], tiny_tokenizer, tmp_path / "ds2", progress=False)


def test_lock_file_does_not_leak_into_shards(corpus, tiny_tokenizer, tmp_path):
    out = prepare_dataset([corpus], tiny_tokenizer, tmp_path / "ds", progress=False)
    assert sorted(os.listdir(out)) == [".lock", "meta.json", "shards", "tokenizer.json", "train", "val"]
