"""`python -m llmrun` entry point."""

from llmrun.startup import entry

entry()
