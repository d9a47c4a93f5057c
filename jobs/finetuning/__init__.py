"""Fine-tuning stage: LoRA on a keras-hub Gemma / Gemma 3 causal LM, with checkpoints and resume."""
