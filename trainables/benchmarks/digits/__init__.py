"""The embedded benchmark: scikit-learn's handwritten digits as a tiny multimodal task suite, on a
tiny Chameleon pretrained here (no downloads).

Modules: ``data`` (tasks, prompts, vocabulary → ``tasks.parquet``), ``tokenizers`` (pixel
quantiser, word tokenizer), ``tiny`` (the random-init tiny Chameleon), ``base_model`` (its
cached pretraining), ``evaluate`` (answer accuracy, generated-digit scores), ``benchmark``
(:class:`DigitsBenchmark`, the engine's view, and the benchmark functions
``prepare``/``open``/``check_inputs``).
"""
