"""specrun: fast local LLM inference through speculative decoding."""

__version__ = "0.1.0"
