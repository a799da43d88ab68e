"""`python -m llmrun` entry point."""

from llmrun.cli import entry

entry()
