"""The native inference engine: scheduler, KV cache, model runner, sampling, speculative decoding, backends.

Models come from `models/`; the engine never defines or reads checkpoints itself.
"""
