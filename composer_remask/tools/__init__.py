"""Scaffolding around the product: nothing in training, the method or the data pipeline imports it.

- ``gguf``: ``remask-import-gguf``, a GGUF base as a local Hugging Face folder (extra ``pretrained``;
  the quality benchmark's pretrained base);
- ``fixtures``: the offline sample rows the demo, the tests and the benchmarks train on;
- ``shared_memory``: removing the shared memory crashed streaming runs left (tests, benches, scripts).
"""
