"""Data: corpus sources, tokenizers, parquet shard formats and per-worker batch streams."""
