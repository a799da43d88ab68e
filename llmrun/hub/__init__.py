"""Model resolution, pulling, GGUF import and the local store."""
