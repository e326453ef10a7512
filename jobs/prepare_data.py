"""Prepare a dataset as parquet shards + manifest.json at a local path or URI: a text corpus (tokenized)
or labelled images (for GANs).

    python jobs/prepare_data.py --source builtin:shakespeare --out ~/datasets/shakespeare-char
    python jobs/prepare_data.py --source ./corpus.txt --out s3://bucket/corpus-bpe --tokenizer bpe
    python jobs/prepare_data.py --source s3://corpora/fineweb-sample/ --text-column text --tokenizer bpe \
           --bpe-vocab-size 50257 --out s3://datasets/fw-bpe
    python jobs/prepare_data.py --source ./corpus/ --tokenizer ./my-hf-model --out ~/datasets/corpus-ft   # fine-tune
    python jobs/prepare_data.py --source builtin:digits --out ~/datasets/digits
    python jobs/prepare_data.py --source mnist:~/data/mnist --out s3://bucket/mnist
    python jobs/prepare_data.py --source images:~/photos --out ~/datasets/photos      # super-resolution
    python jobs/prepare_data.py --source builtin:photos --out ~/datasets/photos

Text sources: a file; a folder or s3:// prefix of .txt/.md files (one document each) and .jsonl, .jsonl.gz and
.parquet files (one document per line or row, its text in --text-column); an http(s):// URL; builtin:shakespeare
or builtin:pydoc. A folder's other files are skipped and counted. Documents are streamed, tokenized in batches and
written as shards fill, an end-of-text token between documents, so memory does not grow with the corpus. A large
corpus is tokenized in parallel by Ray Data (--workers), on an embedded local Ray or the cluster in RAY_ADDRESS;
the dataset is the same as a single-process preparation (--workers 0) of the same input.

Photo sources, for super-resolution: images:<folder or s3:// prefix> (every .png/.jpg/.jpeg file under it, any
size; a seeded --val-fraction of the files held out) or builtin:photos (scikit-image's bundled photographs, offline).

Image and photo sources (mnist:..., builtin:digits, images:..., builtin:photos) ignore the text-only flags (--tokenizer, --bpe-vocab-size,
--chunk-tokens, --shard-tokens, --text-column, --workers, --bpe-sample-mb).
"""

from __future__ import annotations

import functools

import _cli
from cluster.storage import check_access
from genai.data.image_dataset import is_image_source, prepare_image_dataset
from genai.data.photo_dataset import is_photo_source, prepare_photo_dataset
from genai.data.text_dataset import TextPreparation, map_in_process, plan_text_preparation, run_text_preparation

PARALLEL_MIN_BYTES = 64_000_000  # below this, starting Ray costs more than it saves


def main() -> int:
    p = _cli.ArgumentParser(description=__doc__, formatter_class=_cli.argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True,
                   help="text: a file, a folder or s3:// prefix of .txt/.md/.jsonl/.jsonl.gz/.parquet files, an "
                        "http(s):// URL, or builtin:shakespeare / builtin:pydoc; images: mnist:<folder or URI of the MNIST IDX files>, mnist:download, "
                        "or builtin:digits (scikit-learn's 8x8 digits resized to 28x28, offline); photos (super-resolution): "
                        "images:<folder or s3:// prefix of PNG/JPEG files> or builtin:photos")
    p.add_argument("--out", required=True, help="output folder or URI (local path, file:// or s3://)")
    p.add_argument("--tokenizer", default="char",
                   help="text: char (nanoGPT), bpe (byte-level BPE trained on the corpus), or the folder or s3:// URI "
                        "of a Hugging Face model or tokenizer (its tokenizer.json, its eos token between documents: "
                        "the dataset to fine-tune that model on)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share held out for validation (text: of tokens; builtin:digits: of images, per class; "
                        "MNIST uses its test set)")
    p.add_argument("--bpe-vocab-size", type=int, default=4096, help="text: BPE vocabulary size")
    p.add_argument("--chunk-tokens", type=int, default=1024, help="text: tokens per parquet row (any size serves any seq_len)")
    p.add_argument("--shard-tokens", type=int, default=8 * 1024 * 1024, help="text: tokens per parquet shard")
    p.add_argument("--shard-rows", type=int, default=8192, help="images: images per parquet shard")
    p.add_argument("--text-column", default="text", help="text: the field of a .jsonl line / column of a .parquet "
                                                         "row that holds the document")
    p.add_argument("--bpe-sample-mb", type=float, default=256,
                   help="text: BPE is trained on at most this many MB of text, an equal share from the start of "
                        "every file (or row group)")
    p.add_argument("--workers", type=int, default=None,
                   help="text: tokenizer processes under Ray Data; 0 tokenizes in this process without Ray; default: "
                        f"0 for a corpus under {PARALLEL_MIN_BYTES // 1_000_000} MB or of one part, else one per CPU "
                        "of the Ray cluster")
    p.add_argument("--channels", type=int, choices=[1, 3], default=3, help="photos: 3 (RGB) or 1 (grey)")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already prepared at --out")
    args = p.parse_args()
    check_access(args.out)
    if is_photo_source(args.source):
        prepare_photo_dataset(args.source, args.out, channels=args.channels, val_fraction=args.val_fraction,
                              overwrite=args.overwrite)
    elif is_image_source(args.source):
        prepare_image_dataset(args.source, args.out, val_fraction=args.val_fraction, shard_rows=args.shard_rows,
                              overwrite=args.overwrite)
    else:
        if args.workers is not None and args.workers < 0:
            p.error(f"--workers {args.workers}: must be 0 (no Ray) or more")
        prep = plan_text_preparation(args.source, args.out, tokenizer=args.tokenizer, val_fraction=args.val_fraction,
                                     bpe_vocab_size=args.bpe_vocab_size, chunk_tokens=args.chunk_tokens,
                                     shard_tokens=args.shard_tokens, overwrite=args.overwrite,
                                     text_column=args.text_column, bpe_sample_mb=args.bpe_sample_mb)
        run_text_preparation(prep, map_parts=_map_parts(args.workers, prep))
    return _cli.EXIT_OK


def _map_parts(workers: int | None, prep: TextPreparation):
    """In this process for a small corpus or --workers 0; otherwise Ray Data actors, connected only now that the
    input has been checked."""
    parts = len(prep.corpus.parts)
    if workers == 0 or (workers is None and (prep.corpus.bytes < PARALLEL_MIN_BYTES or parts == 1)):
        print(f"tokenizing in this process ({parts:,} part(s))")
        return map_in_process
    from cluster.parallel import cluster_cpus, ordered_map
    from cluster.ray_env import connect

    connect(cpus_needed=workers or 1, quiet=True)
    workers = min(workers or cluster_cpus(), parts)
    print(f"tokenizing with Ray Data: {workers} worker(s) over {parts:,} part(s)")
    return functools.partial(ordered_map, workers=workers)


if __name__ == "__main__":
    _cli.run_main(main)
