"""llmrun: run large language models locally and offline."""

__version__ = "0.1.0"
