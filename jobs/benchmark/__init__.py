"""Benchmark stage: perplexity of the base and tuned models on the same tokens, with a quality gate."""
