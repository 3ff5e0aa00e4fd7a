"""The real-scale benchmark: CoIN instruction tasks and an image-generation stream, imported by
``mode-cl data import-coin``, on a Chameleon/Anole checkpoint.

Modules: ``records`` (CoIN JSON/JSONL parsing), ``store`` (manifest and Parquet shards), ``data``
(tokenising and importing), ``chameleon`` (model loading, vocabulary layout, VQ tokenizer),
``benchmark`` (:class:`CoinBenchmark`, the engine's view, and the benchmark functions
``prepare``/``open``/``check_inputs``), ``decoding`` / ``sharding`` (greedy
answers with a KV cache, work split across ranks), ``scoring`` (answer matching), ``t2i`` /
``vqgan`` / ``clip_scores`` (sampled text-to-image scores).
"""
