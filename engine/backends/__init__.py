"""Backends behind the server: `native` (this project's engine) and `vllm` (vLLM's AsyncLLM), one protocol
(engine/backend.py). server/cli.py imports the one it serves by name, so neither's heavy dependencies load unless
it is used."""
