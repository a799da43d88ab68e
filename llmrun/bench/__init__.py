"""`llmrun bench`: a fixed workload measured on llmrun and, in the same run, on transformers/accelerate."""
