"""Gemma 3: keras-hub's `Gemma3CausalLM`, text only (the 270M and 1B are text models; larger presets' vision
encoder is not used by this pipeline). The interface's defaults are Gemma 3's."""

from __future__ import annotations

from jobs.families.base import ChatFormat, Family

FAMILY = Family(
    name="gemma3", title="Gemma 3", causal_lm="Gemma3CausalLM", backbone="Gemma3Backbone", tokenizer="Gemma3Tokenizer",
    preset_prefixes=("gemma3_", "medgemma_", "function_gemma_", "translategemma_"), hf_model_types=("gemma3_text",), hf_text_architectures=("Gemma3ForCausalLM",),
    preset_modules=("keras_hub.src.models.gemma3.gemma3_presets",),
    chat=ChatFormat("<start_of_turn>", "<end_of_turn>"),
)
