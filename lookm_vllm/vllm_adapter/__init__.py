"""vLLM 0.32 V1 adapter: the only package that imports vLLM internals."""
