"""tritonkv: a paged-KV LLM engine served from NVIDIA Triton's Python backend."""

__version__ = "0.1.0"
