"""DyVTE export tool: split a multimodal LLM with dynamic visual-token exit into deployable graphs."""

__version__ = "0.1.0"
