"""The interface every model family implements (`jobs.families`). Defaults fit Gemma 3; a family overrides what
differs. Methods import keras-hub, keras or jax lazily: the attributes alone are what the DAG and convert read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.contract.errors import BadInputError


@dataclass(frozen=True)
class ChatFormat:
    """A family's chat turns: `{start}user\\n{text}{end}\\n{start}model\\n{answer}{end}`. The end-of-turn marker
    is the one token every loss segment ends with: what the model learns to stop on and the export stops on."""

    start_of_turn: str
    end_of_turn: str
    user_role: str = "user"
    model_role: str = "model"

    def user_turn(self, text: str, first: bool = True) -> str:
        lead = "" if first else "\n"  # the newline after the previous turn's end
        return (f"{lead}{self.start_of_turn}{self.user_role}\n{text}{self.end_of_turn}\n"
                f"{self.start_of_turn}{self.model_role}\n")

    def model_turn(self, answer: str) -> str:
        return answer + self.end_of_turn


@dataclass(frozen=True)
class Family:
    name: str  # as configs and the DAG name it
    title: str  # as messages name it
    causal_lm: str  # keras-hub class names
    backbone: str
    tokenizer: str
    preset_prefixes: tuple[str, ...]  # keras-hub preset names of the family start with one of these
    hf_model_types: tuple[str, ...]  # config.json `model_type` of its Hugging Face checkpoints
    # Text-only causal-LM architectures whose safetensors hold the weights under the names the PEFT adapter uses:
    # convert merges those without Keras; other architectures of the family (multimodal) go through keras-hub.
    hf_text_architectures: tuple[str, ...]
    chat: ChatFormat
    # What LoRA can target, as keras-hub names the layers (`enable_lora(target_layer_names=...)`): the projections
    # the PEFT adapter maps (jobs/common/peft_adapter.py), attention and feed-forward.
    lora_layers: tuple[str, ...] = ("query", "key", "value", "attention_output", "ffw_gating", "ffw_gating_2", "ffw_linear")
    model_parallel: bool = True  # a layout map exists
    # keras-hub modules whose `backbone_presets` list the family's presets (with their parameter counts): the
    # source of the DAG's preset index (`gemma_pipeline.tools.generate write model_presets`).
    preset_modules: tuple[str, ...] = ()

    @property
    def class_names(self) -> tuple[str, ...]:
        return (self.causal_lm, self.backbone, self.tokenizer, self.causal_lm + "Preprocessor")

    # ---- loading and calling

    def load(self, handle: str, **kwargs: Any) -> Any:
        """The causal LM from a preset directory or handle, text only."""
        import keras_hub

        return keras_hub.models.CausalLM.from_preset(handle, **kwargs)

    def backbone_inputs(self, token_ids: Any, padding_mask: Any) -> dict[str, Any]:
        """What the backbone takes for a batch of text (arrays of shape (batch, width))."""
        return {"token_ids": token_ids, "padding_mask": padding_mask}

    def check_lora_targets(self, targets: tuple[str, ...] | list[str], field: str = "--lora-targets") -> None:
        unknown = [t for t in targets if t not in self.lora_layers]
        if unknown:
            raise BadInputError(field, ",".join(targets), f"layer names a {self.title} model has LoRA for: "
                                f"{', '.join(self.lora_layers)}", f"unknown: {', '.join(unknown)}")

    # ---- model parallel

    def layout_map(self, device_mesh: Any, model_dim: str = "model") -> Any:
        """Shard the big kernels over the model axis. Query heads and the feed-forward width are split; key/value
        kernels split the hidden dimension because these models often have a single key/value head."""
        import keras

        layout_map = keras.distribution.LayoutMap(device_mesh)
        layout_map["token_embedding/embeddings"] = (model_dim, None)
        layout_map["decoder_block.*attention/query/kernel"] = (model_dim, None, None)
        layout_map["decoder_block.*attention/(key|value)/kernel"] = (None, model_dim, None)
        layout_map["decoder_block.*attention_output/kernel"] = (model_dim, None, None)
        layout_map["decoder_block.*ffw_gating(_2)?/kernel"] = (None, model_dim)
        layout_map["decoder_block.*ffw_linear/kernel"] = (model_dim, None)
        return layout_map

    def model_parallel_sizes(self, backbone: Any) -> dict[str, int]:
        """The sizes the model axis must divide."""
        return {"query heads": backbone.num_query_heads, "hidden size": backbone.hidden_dim,
                "feed-forward size": backbone.intermediate_dim, "vocabulary": backbone.vocabulary_size}

    # ---- export

    def finish_export(self, directory: Path, backbone: Any) -> None:
        """Fix what keras-hub's exporter writes for this family, in place (nothing by default)."""
