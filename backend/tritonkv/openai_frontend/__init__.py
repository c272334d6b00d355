"""OpenAI-compatible HTTP endpoints in front of the ``llm_stateless`` Triton model.

A separate process (``python -m tritonkv.openai_frontend``, started and stopped by the
launcher): FastAPI + uvicorn answer ``/v1/models``, ``/v1/completions`` and
``/v1/chat/completions``; each request becomes one gRPC stream into Triton
(``tritonclient.grpc.aio``), so the frontend is a plain Triton client and a crash of it never
touches tritonserver.

Modules: ``errors`` (OpenAI error objects), ``schema`` (request bodies and their checks),
``chat_template`` (tokenizer_config.json's template, rendered as transformers does),
``served_model`` (name, tokenizer, template), ``triton_bridge`` (gRPC streaming, cancel),
``responses`` (JSON bodies and SSE chunks), ``app`` (routes), ``__main__`` (process entry).
"""
