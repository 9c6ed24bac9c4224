"""Demo models and images: tiny deterministic VLMs built on the spot and real sample photos.

Used by the demo server (``lookm-serve`` without ``--model``), the evaluation harness, the
benchmarks and the tests (``tiny_models``, ``images``).
"""
