"""Checkpoint weights: the safetensors header index and loading tensors from it."""
