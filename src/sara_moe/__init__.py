"""sara-moe: Semantically Anchored Routing Alignment for Hugging Face Mixture-of-Experts LLMs."""

__version__ = "0.1.0"
