"""`llmrun serve`: an OpenAI- and Ollama-compatible HTTP server over the engine loop."""
