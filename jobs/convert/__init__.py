"""Convert stage: Keras checkpoints to Hugging Face transformers format (and the demo model's import)."""
