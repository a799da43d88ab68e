"""`python -m llmrun` entry point."""

from llmrun.cli import main

main()
