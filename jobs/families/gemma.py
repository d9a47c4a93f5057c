"""Gemma (1 and 2): keras-hub's `GemmaCausalLM` (Gemma 2 presets use the same classes)."""

from __future__ import annotations

from typing import Any

from jobs.families.base import ChatFormat, Family


class _Gemma(Family):
    def model_parallel_sizes(self, backbone: Any) -> dict[str, int]:
        return {}  # refused before: keras-hub's Gemma has its own layout map, not wired here


FAMILY = _Gemma(
    name="gemma", title="Gemma (1 and 2)", causal_lm="GemmaCausalLM", backbone="GemmaBackbone",
    tokenizer="GemmaTokenizer", preset_prefixes=("gemma_", "gemma2_", "code_gemma_", "shieldgemma_", "vault_gemma_", "c2s_scale_gemma_"),
    hf_model_types=("gemma", "gemma2"), hf_text_architectures=("GemmaForCausalLM", "Gemma2ForCausalLM"),
    preset_modules=("keras_hub.src.models.gemma.gemma_presets",),
    chat=ChatFormat("<start_of_turn>", "<end_of_turn>"), model_parallel=False,
)
