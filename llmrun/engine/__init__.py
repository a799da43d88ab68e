"""The generation engine: sequences, scheduling, the model runner, sampling and TokenEvents."""
