"""Native decoders: shared layers, one module per model family, and the architecture registry."""
