"""`llmrun chat`: a multi-turn conversation whose KV blocks stay cached between turns."""
