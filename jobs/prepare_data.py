"""Prepare a dataset as parquet shards + manifest.json at a local path or URI: a text corpus (tokenized)
or labelled images (for GANs).

    python jobs/prepare_data.py --source builtin:shakespeare --out ~/datasets/shakespeare-char
    python jobs/prepare_data.py --source ./corpus.txt --out s3://bucket/corpus-bpe --tokenizer bpe
    python jobs/prepare_data.py --source builtin:digits --out ~/datasets/digits
    python jobs/prepare_data.py --source mnist:~/data/mnist --out s3://bucket/mnist

Image sources (mnist:..., builtin:digits) ignore the text-only flags (--tokenizer, --bpe-vocab-size,
--chunk-tokens, --shard-tokens).
"""

from __future__ import annotations

import _cli
from cluster.storage import check_access
from genai.data.image_dataset import is_image_source, prepare_image_dataset
from genai.data.text_dataset import prepare_text_dataset


def main() -> int:
    p = _cli.ArgumentParser(description=__doc__, formatter_class=_cli.argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True,
                   help="text: a file, a folder of .txt/.md files, an http(s):// URL, or builtin:shakespeare / "
                        "builtin:pydoc; images: mnist:<folder or URI of the MNIST IDX files>, mnist:download, "
                        "or builtin:digits (scikit-learn's 8x8 digits resized to 28x28, offline)")
    p.add_argument("--out", required=True, help="output folder or URI (local path, file:// or s3://)")
    p.add_argument("--tokenizer", choices=["char", "bpe"], default="char",
                   help="text: char (nanoGPT) or byte-level BPE")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share held out for validation (text: of tokens; builtin:digits: of images, per class; "
                        "MNIST uses its test set)")
    p.add_argument("--bpe-vocab-size", type=int, default=4096, help="text: BPE vocabulary size")
    p.add_argument("--chunk-tokens", type=int, default=1024, help="text: tokens per parquet row (>= 2 x (seq_len + 1))")
    p.add_argument("--shard-tokens", type=int, default=8 * 1024 * 1024, help="text: tokens per parquet shard")
    p.add_argument("--shard-rows", type=int, default=8192, help="images: images per parquet shard")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already prepared at --out")
    args = p.parse_args()
    check_access(args.out)
    if is_image_source(args.source):
        prepare_image_dataset(args.source, args.out, val_fraction=args.val_fraction, shard_rows=args.shard_rows,
                              overwrite=args.overwrite)
    else:
        prepare_text_dataset(args.source, args.out, tokenizer=args.tokenizer, val_fraction=args.val_fraction,
                             bpe_vocab_size=args.bpe_vocab_size, chunk_tokens=args.chunk_tokens,
                             shard_tokens=args.shard_tokens, overwrite=args.overwrite)
    return _cli.EXIT_OK


if __name__ == "__main__":
    _cli.run_main(main)
