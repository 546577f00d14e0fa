"""`hybridlm tokenizer train FILES_OR_DIRS... --vocab-size N --out tokenizer.json`: a byte-level BPE on local text."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("tokenizer", help="train tokenizers", description="Train tokenizers.")
    actions = parser.add_subparsers(dest="tokenizer_action", metavar="ACTION", required=True)
    train = actions.add_parser(
        "train",
        help="train a byte-level BPE tokenizer on local text",
        description="Train a byte-level BPE tokenizer (special tokens <|endoftext|> = EOS, id 0, and <|pad|>, id 1) "
        "on local text: directories are searched recursively for .txt/.md/.py files, .jsonl files (field 'text') "
        "and .parquet files (column 'text'). Deterministic: the same files give the same tokenizer.json.",
    )
    train.add_argument("sources", nargs="+", metavar="FILES_OR_DIRS",
                       help="text files, JSONL/Parquet files or directories")
    train.add_argument("--vocab-size", type=int, required=True,
                       help="vocabulary size, special tokens and bytes included")
    train.add_argument("--out", required=True, help="tokenizer.json to write")
    train.add_argument("--min-frequency", type=int, default=2, help="least count for a merge to be learned (default 2)")
    train.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from hybridlm.data.sources import collect_pieces, iter_documents
    from hybridlm.data.tokenizer import Tokenizer, train_bpe_tokenizer

    try:
        pieces = collect_pieces(args.sources)
        if not pieces:
            raise ValueError(f"found no documents in {args.sources}: expected .txt/.md/.py, .jsonl or .parquet files")
        texts = (text for _, text in iter_documents(pieces))
        out = train_bpe_tokenizer(texts, args.vocab_size, args.out, min_frequency=args.min_frequency)
    except (FileNotFoundError, ValueError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    tokenizer = Tokenizer(out)
    print(f"{out}: vocab_size={tokenizer.vocab_size} eos={tokenizer.eos_token!r} (id {tokenizer.eos_token_id}) "
          f"sha256={tokenizer.sha256}")
    return 0
