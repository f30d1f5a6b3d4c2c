"""Scaffolding around the product, never imported by training, the method or the data pipeline.

``fixtures`` writes the offline sample rows the demo, the tests and the benchmarks train on.
"""
