"""Remote-base mode: alignserve's API and strategies in front of another OpenAI-compatible
server (vLLM, llama.cpp, another alignserve) that does the base model's work.

Layering: server -> remote (this package, an engine client over HTTP) -> decoders' shared
helpers -> value_models. ``client.RemoteEngineClient`` has the in-process ``EngineClient``'s
surface; ``http`` talks to the remote; ``strategies`` are the per-strategy async loops.
"""
