"""LOOK-M multimodal KV-cache compression for vLLM.

Layers (arrows point one way):
  lookm_vllm.core          the algorithm, pure torch, no vLLM import
  lookm_vllm.vllm_adapter  the only code touching vLLM internals
  lookm_vllm.server        HTTP server and CLI, no tensors (sources in the top-level server/)
  lookm_vllm.demo          tiny demo VLMs built on the spot, real photos (demo server, eval, tests)
  lookm_vllm.testing       test/benchmark helpers (server processes)
"""

__version__ = "0.1.0"
