"""LOOK-M multimodal KV-cache compression for vLLM.

Layers (arrows point one way):
  lookm_vllm.core          the algorithm, pure torch, no vLLM import
  lookm_vllm.vllm_adapter  the only code touching vLLM internals
  server/                  HTTP server and CLI (no tensors)
  lookm_vllm.testing       tiny test VLMs built on the spot (tests, benchmarks, demo server)
"""

__version__ = "0.1.0"
