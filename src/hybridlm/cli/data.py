"""`hybridlm data prepare SOURCES... --tokenizer TOK --out DIR`: tokenize text into a dataset on disk.

`hybridlm data embedded` builds (or finds in the cache) the default dataset made of the Python
standard library's sources and prints its directory.
"""

from __future__ import annotations

import argparse
import sys

# Kept equal to hybridlm.data.prepare.DEFAULT_VAL_FRACTION (a test checks it); repeated here so that
# building the parser imports nothing heavy.
DEFAULT_VAL_FRACTION = 0.02


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="prepare token datasets for training",
                                   description="Prepare token datasets for training.")
    actions = parser.add_subparsers(dest="data_action", metavar="ACTION", required=True)

    prepare = actions.add_parser(
        "prepare",
        help="tokenize text sources into token arrays with a held-out split",
        description="Tokenize text sources into token-id arrays on disk (one shard per work unit, a document "
        "index, a held-out split by document and meta.json). Directories are searched recursively for "
        ".txt/.md/.py files (one document each), .jsonl files (field 'text', one document per line) and "
        ".parquet files (column 'text', needs pyarrow). Re-running skips finished shards.",
    )
    prepare.add_argument("sources", nargs="+", help="directories, text files, JSONL or Parquet files")
    prepare.add_argument("--tokenizer", required=True, help="a Hugging Face tokenizer.json (or a folder holding one)")
    prepare.add_argument("--out", required=True, help="dataset directory to write")
    prepare.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION,
                         help=f"expected share of documents held out for validation; at least one always is "
                         f"(default {DEFAULT_VAL_FRACTION})")
    prepare.add_argument("--workers", type=int, default=None, help="tokenizing processes (default: all cores)")
    prepare.add_argument("--eos-token", default=None,
                         help="end-of-document token appended after each document, as a string or an id "
                         "(default: found by name, e.g. <|endoftext|> or </s>)")
    prepare.add_argument("--shard-mb", type=float, default=16.0, help="source megabytes per shard (default 16)")
    prepare.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    prepare.set_defaults(func=run_prepare)

    embedded = actions.add_parser(
        "embedded",
        help="build or find the default dataset (the Python standard library) and print its directory",
        description="Build (first time, well under a minute) or find in the cache the embedded default dataset: "
        "the Python standard library's *.py files with a BPE tokenizer trained on them. Prints its directory.",
    )
    embedded.add_argument("--cache-dir", default=None, help="cache root (default $HYBRIDLM_CACHE or ~/.cache/hybridlm)")
    embedded.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size (default 8192)")
    embedded.add_argument("--workers", type=int, default=None, help="tokenizing processes (default: all cores)")
    embedded.set_defaults(func=run_embedded)


def _summary(path) -> str:
    from hybridlm.data import TokenDataset

    dataset = TokenDataset(path)
    lines = [f"{dataset.path}: vocab_size={dataset.vocab_size} eos_id={dataset.eos_id} dtype={dataset.dtype.name} "
             f"tokenizer={dataset.tokenizer_path}"]
    for name, split in dataset.meta["splits"].items():
        lines.append(f"  {name}: {split['n_tokens']:,} tokens, {split['n_documents']:,} documents, "
                     f"{split['n_bytes']:,} bytes, {len(split['shards'])} shards")
    return "\n".join(lines)


def run_prepare(args: argparse.Namespace) -> int:
    from hybridlm.data import prepare_dataset

    try:
        out = prepare_dataset(args.sources, args.tokenizer, args.out, val_fraction=args.val_fraction,
                              workers=args.workers, eos_token=args.eos_token,
                              shard_bytes=int(args.shard_mb * (1 << 20)), progress=not args.no_progress)
    except (FileNotFoundError, ValueError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(_summary(out))
    return 0


def run_embedded(args: argparse.Namespace) -> int:
    from hybridlm.data import ensure_embedded_dataset

    out = ensure_embedded_dataset(args.cache_dir, vocab_size=args.vocab_size, workers=args.workers)
    print(_summary(out))
    return 0
