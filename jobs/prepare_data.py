"""Prepare a text corpus as tokenized parquet shards + manifest.json at a local path or URI.

    python jobs/prepare_data.py --source builtin:shakespeare --out ~/datasets/shakespeare-char
    python jobs/prepare_data.py --source ./corpus.txt --out s3://bucket/corpus-bpe --tokenizer bpe
"""

from __future__ import annotations

import _cli
from cluster.storage import check_access
from genai.data.text_dataset import prepare_text_dataset


def main() -> int:
    p = _cli.ArgumentParser(description=__doc__, formatter_class=_cli.argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True,
                   help="a text file, a folder of .txt/.md files, an http(s):// URL, or builtin:shakespeare / builtin:pydoc")
    p.add_argument("--out", required=True, help="output folder or URI (local path, file:// or s3://)")
    p.add_argument("--tokenizer", choices=["char", "bpe"], default="char", help="char (nanoGPT) or byte-level BPE")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of tokens held out for validation")
    p.add_argument("--bpe-vocab-size", type=int, default=4096, help="BPE vocabulary size")
    p.add_argument("--chunk-tokens", type=int, default=1024, help="tokens per parquet row (>= 2 x (seq_len + 1))")
    p.add_argument("--shard-tokens", type=int, default=8 * 1024 * 1024, help="tokens per parquet shard")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already prepared at --out")
    args = p.parse_args()
    check_access(args.out)
    prepare_text_dataset(args.source, args.out, tokenizer=args.tokenizer, val_fraction=args.val_fraction,
                         bpe_vocab_size=args.bpe_vocab_size, chunk_tokens=args.chunk_tokens,
                         shard_tokens=args.shard_tokens, overwrite=args.overwrite)
    return _cli.EXIT_OK


if __name__ == "__main__":
    _cli.run_main(main)
