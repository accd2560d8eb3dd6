"""memupdate: keep a served LLM's knowledge current with law-sized, MemFT-trained LoRA adapters."""

__version__ = "0.1.0"
