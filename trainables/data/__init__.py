"""Benchmark data: tokenizers, task construction and the Parquet task files."""
