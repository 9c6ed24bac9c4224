"""OpenAI-compatible HTTP server with per-request LOOK-M KV compression."""
