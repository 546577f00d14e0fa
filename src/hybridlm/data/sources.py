"""Text sources: finding documents on disk and reading them as a stream.

A source is a directory (searched recursively), a text file (.txt/.md/.py: one document), a
JSONL file (one document per line, its `text` field) or a Parquet file (one document per row,
its `text` column; needs pyarrow). Each document has a key that names it stably:

    directory file      relative/path/inside/the/directory.py
    text file           file.txt
    JSONL record        data.jsonl@<byte offset of its line>
    Parquet record      data.parquet#<row index>

Keys decide the held-out split (see prepare.py), so they avoid absolute paths: moving a corpus
does not change which documents are held out.

Large JSONL and Parquet files are cut into pieces (byte ranges / row-group ranges) so that
several workers can read one file; a JSONL line belongs to the piece where it starts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".md", ".py")
JSONL_SUFFIXES = (".jsonl",)
PARQUET_SUFFIXES = (".parquet",)


@dataclass(frozen=True)
class Piece:
    """A readable part of one file: a whole text file, a byte range of a JSONL file, or row groups of a Parquet file.

    `start`/`end` are bytes (JSONL) or row-group indices (Parquet); unused for text files.
    `size` is the number of source bytes the piece covers, used to balance work.
    """

    kind: str  # "text" | "jsonl" | "parquet"
    path: str
    key: str
    start: int
    end: int
    size: int
    mtime_ns: int

    def describe(self) -> dict:
        return {"kind": self.kind, "path": self.path, "key": self.key, "start": self.start, "end": self.end,
                "size": self.size, "mtime_ns": self.mtime_ns}


def _import_parquet():
    try:
        import pyarrow.parquet as parquet
    except ImportError as error:
        raise ImportError(
            "reading Parquet sources needs pyarrow, which is not installed: `pip install pyarrow`, "
            "or convert the data to JSONL (one {\"text\": ...} object per line)"
        ) from error
    return parquet


def _file_pieces(path: Path, key: str, piece_bytes: int, text_suffixes: Sequence[str]) -> list[Piece]:
    stat = path.stat()
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        ranges = [(start, min(start + piece_bytes, stat.st_size)) for start in range(0, stat.st_size, piece_bytes)]
        return [Piece("jsonl", str(path), key, start, end, end - start, stat.st_mtime_ns) for start, end in ranges]
    if name.endswith(PARQUET_SUFFIXES):
        metadata = _import_parquet().ParquetFile(path).metadata
        pieces, group_start, group_bytes = [], 0, 0
        for group in range(metadata.num_row_groups):
            group_bytes += metadata.row_group(group).total_byte_size
            if group_bytes >= piece_bytes or group == metadata.num_row_groups - 1:
                pieces.append(Piece("parquet", str(path), key, group_start, group + 1, group_bytes, stat.st_mtime_ns))
                group_start, group_bytes = group + 1, 0
        return pieces
    if name.endswith(tuple(text_suffixes)):
        return [Piece("text", str(path), key, 0, stat.st_size, stat.st_size, stat.st_mtime_ns)]
    return []


def collect_pieces(
    sources: Sequence[str | Path],
    *,
    piece_bytes: int = 64 << 20,
    text_suffixes: Sequence[str] = TEXT_SUFFIXES,
    exclude_dirs: Sequence[str] = (),
    select: Callable[[str], bool] | None = None,
) -> list[Piece]:
    """All readable pieces of `sources`, in a deterministic order.

    Sources keep the order given; inside a directory files are sorted by relative path. Hidden
    files and directories (name starting with ".") and directories named in `exclude_dirs` are
    skipped, and so are files whose relative path `select` rejects. A file named directly must
    have a known suffix.
    """
    known = (*text_suffixes, *JSONL_SUFFIXES, *PARQUET_SUFFIXES)
    pieces: list[Piece] = []
    for source in sources:
        root = Path(source).expanduser()
        if not root.exists():
            raise FileNotFoundError(f"source {root} does not exist: expected a directory or a {'/'.join(known)} file")
        if root.is_file():
            found = _file_pieces(root, root.name, piece_bytes, text_suffixes)
            if not found and not root.name.lower().endswith(known):
                raise ValueError(f"source {root} has an unsupported type: expected one of {', '.join(known)} "
                                 "(or a directory)")
            pieces.extend(found)
            continue
        files = []
        for directory, subdirectories, names in os.walk(root):
            subdirectories[:] = [d for d in subdirectories if not d.startswith(".") and d not in exclude_dirs]
            files.extend(Path(directory) / name for name in names if not name.startswith("."))
        for path in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
            key = path.relative_to(root).as_posix()
            if path.is_file() and (select is None or select(key)):
                pieces.extend(_file_pieces(path, key, piece_bytes, text_suffixes))
    return pieces


def read_text_file(path: str | Path) -> str:
    """A text file as one document. Bytes that are not valid UTF-8 become U+FFFD rather than failing the run."""
    return Path(path).read_bytes().decode("utf-8", errors="replace")


def _jsonl_documents(piece: Piece) -> Iterator[tuple[str, str]]:
    with open(piece.path, "rb") as f:
        if piece.start > 0:
            # The line that straddles `start` belongs to the previous piece: skip to the next line start.
            f.seek(piece.start - 1)
            f.readline()
        while (offset := f.tell()) < piece.end:
            line = f.readline()
            if not line:
                break
            if not line.strip():
                continue
            where = f"{piece.path} (line starting at byte {offset})"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where} is not valid JSON ({error}): expected one JSON object per line") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                found = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(f"{where} has no string field 'text' (found {found}): each JSONL line must be "
                                 "an object like {\"text\": \"...\"}")
            yield f"{piece.key}@{offset}", record["text"]


def _parquet_documents(piece: Piece) -> Iterator[tuple[str, str]]:
    parquet_file = _import_parquet().ParquetFile(piece.path)
    if "text" not in parquet_file.schema_arrow.names:
        raise ValueError(f"{piece.path} has no 'text' column (columns: {parquet_file.schema_arrow.names}): "
                         "expected a string column named 'text'")
    row = sum(parquet_file.metadata.row_group(g).num_rows for g in range(piece.start))
    for group in range(piece.start, piece.end):
        for text in parquet_file.read_row_group(group, columns=["text"]).column("text").to_pylist():
            if text is not None:
                yield f"{piece.key}#{row}", text
            row += 1


def iter_documents(pieces: Sequence[Piece]) -> Iterator[tuple[str, str]]:
    """(key, text) for every non-empty document of `pieces`, in order, reading one document at a time."""
    for piece in pieces:
        if piece.kind == "text":
            documents = iter([(piece.key, read_text_file(piece.path))])
        elif piece.kind == "jsonl":
            documents = _jsonl_documents(piece)
        else:
            documents = _parquet_documents(piece)
        for key, text in documents:
            if text:
                yield key, text
