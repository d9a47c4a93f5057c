"""Gemma 4: keras-hub's `Gemma4CausalLM`, text only. Its presets are multimodal; this pipeline fine-tunes the text
decoder and leaves the vision and audio encoders out of the model it loads (and says so).

What differs from Gemma 3, and where it is handled:
- the backbone takes `position_ids` besides token ids and padding mask (`backbone_inputs`);
- chat turns are `<|turn>user ... <turn|>`: the end-of-turn token is `<turn|>` (`chat`);
- per-layer input embeddings (a vocabulary × layers table), shared key/value layers (no key or value of their
  own: LoRA on those names skips them), global layers with their own head size and partial RoPE, and, in the
  26B-A4B, a mixture-of-experts bank beside each dense feed-forward block;
- LoRA targets attention and the dense feed-forward layers only. The experts are raw (experts, in, out) weights,
  not `EinsumDense` layers, and keras-hub gives them no LoRA; their router picks among them per token, so an
  adapter on attention alone leaves routing as trained. (`lora_layers`; docs/models.md says the same.)
- keras-hub 0.32's exporter writes `architectures: [Gemma4TextModel]`, no RoPE type and no `attention_k_eq_v`,
  so transformers would load a model that is not the one trained (partial RoPE read as full: logits off by 0.1;
  K=V models' value projections random), and `num_global_key_value_heads` on models without K=V, which keras-hub's
  importer then reads as K=V; `finish_export` writes what transformers, vLLM and keras-hub read back.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from jobs.families.base import ChatFormat, Family

log = logging.getLogger(__name__)

ARCHITECTURE = "Gemma4ForCausalLM"  # what vLLM picks its model class by (its registry), and transformers loads
ENCODERS = {"vision_encoder": "vision encoder", "audio_encoder": "audio encoder"}  # keras-hub preset config keys
HF_ENCODERS = {"vision_config": "vision encoder", "audio_config": "audio encoder"}  # Hugging Face config keys


def ignored_parts(config: dict[str, Any]) -> list[str]:
    """The parts of a Gemma 4 checkpoint this pipeline leaves out (its config.json: keras-hub preset or HF)."""
    inner = config.get("config", {}) if "registered_name" in config or "class_name" in config else {}
    parts = [name for key, name in ENCODERS.items() if inner.get(key)]
    parts += [name for key, name in HF_ENCODERS.items() if config.get(key)]
    return sorted(set(parts))


class _Gemma4(Family):
    def load(self, handle: str, **kwargs: Any) -> Any:
        import keras_hub

        config = _read_config(handle)
        ignored = ignored_parts(config) if config else []
        backbone = keras_hub.models.Gemma4Backbone.from_preset(handle, vision_encoder=None, audio_encoder=None, **kwargs)
        try:
            preprocessor = keras_hub.models.Gemma4CausalLMPreprocessor.from_preset(
                handle, image_converter=None, audio_converter=None, video_converter=None)
        except FileNotFoundError:  # a text-only Hugging Face checkpoint has no processor_config.json: the tokenizer
            preprocessor = keras_hub.models.Gemma4CausalLMPreprocessor(
                tokenizer=keras_hub.models.Gemma4Tokenizer.from_preset(handle), image_converter=None)
        if ignored:
            log.warning("%s is a multimodal Gemma 4 checkpoint: the text decoder, its embeddings and tokenizer are used; "
                        "the %s %s not loaded (this pipeline fine-tunes text)", handle, " and ".join(ignored),
                        "is" if len(ignored) == 1 else "are")
        return keras_hub.models.Gemma4CausalLM(backbone=backbone, preprocessor=preprocessor)

    def backbone_inputs(self, token_ids: Any, padding_mask: Any) -> dict[str, Any]:
        # Positions count from 0 on every row (rows are right-padded); packed documents get document masks, and
        # RoPE makes attention depend on relative positions only, as for Gemma 3.
        import numpy as np

        if isinstance(token_ids, np.ndarray):
            positions = np.broadcast_to(np.arange(token_ids.shape[1], dtype=np.int32), token_ids.shape)
        else:
            import jax.numpy as jnp

            positions = jnp.broadcast_to(jnp.arange(token_ids.shape[1], dtype=jnp.int32), token_ids.shape)
        return {"token_ids": token_ids, "padding_mask": padding_mask, "position_ids": positions}

    def layout_map(self, device_mesh: Any, model_dim: str = "model") -> Any:
        layout_map = super().layout_map(device_mesh, model_dim)
        # The per-layer input table (vocabulary × layers · width) is as big as the embeddings: split its rows too.
        layout_map["per_layer_token_embedding/embeddings"] = (model_dim, None)
        layout_map["per_layer_model_projection/kernel"] = (None, model_dim)
        # Experts (experts, hidden, width) and (experts, width, hidden): split every expert's width, as the dense
        # feed-forward block is split, so each device holds a slice of every expert and routing needs no exchange.
        layout_map["decoder_block.*moe_expert_bank/(gate_proj|up_proj)"] = (None, None, model_dim)
        layout_map["decoder_block.*moe_expert_bank/down_proj"] = (None, model_dim, None)
        return layout_map

    def model_parallel_sizes(self, backbone: Any) -> dict[str, int]:
        sizes = super().model_parallel_sizes(backbone)
        if backbone.enable_moe_block:
            sizes["expert width"] = backbone.expert_intermediate_dim
        return sizes

    def finish_export(self, directory: Path, backbone: Any) -> None:
        path = directory / "config.json"
        config = json.loads(path.read_text())
        config["architectures"] = [ARCHITECTURE]
        rope = config.get("rope_parameters") or {}
        if "full_attention" in rope:
            rope["full_attention"]["rope_type"] = "proportional"
        if "sliding_attention" in rope:
            rope["sliding_attention"]["rope_type"] = "default"
        config["rope_parameters"] = rope
        if getattr(backbone, "num_global_key_value_heads", None) is not None:
            config["attention_k_eq_v"] = True
        else:
            # The exporter writes num_global_key_value_heads = num_key_value_heads for every model, and keras-hub's
            # own importer reads any value there as K=V: the export read back would lose its global layers' value
            # projections (transformers ignores the key without attention_k_eq_v).
            config.pop("num_global_key_value_heads", None)
        path.write_text(json.dumps(config, indent=2))
        if (directory / "tokenizer.model").exists() and not (directory / "tokenizer.json").exists():
            # keras-hub writes the SentencePiece model only; its own Gemma 4 loader (and fast tokenizers) read
            # tokenizer.json, which transformers converts from it.
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(str(directory)).save_pretrained(str(directory))


def _read_config(handle: str) -> dict[str, Any]:
    path = Path(handle) / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


FAMILY = _Gemma4(
    name="gemma4", title="Gemma 4", causal_lm="Gemma4CausalLM", backbone="Gemma4Backbone", tokenizer="Gemma4Tokenizer",
    preset_prefixes=("gemma4_",), hf_model_types=("gemma4_text", "gemma4"), hf_text_architectures=(ARCHITECTURE,),
    preset_modules=("keras_hub.src.models.gemma4.gemma4_presets",),
    chat=ChatFormat("<|turn>", "<turn|>"),
)
