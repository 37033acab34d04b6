"""polyft: config-driven experiments for adapting LLMs to many languages."""

__version__ = "0.1.0"
