"""Test and benchmark helpers (server subprocesses); the demo models live in lookm_vllm.demo."""
