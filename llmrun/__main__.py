"""`python -m llmrun` entry point."""

from llmrun.launch import entry

entry()
