"""Tiny random-weight Gemma, Gemma 3 and Gemma 4 causal LMs with a SentencePiece model trained on the spot.

Everything here runs in seconds on a CPU and downloads nothing.
"""

from __future__ import annotations

import io
from pathlib import Path

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Return the absolute value of a number.",
    "What does os.path.join do?",
    "Join one or more path segments intelligently.",
    "Split a string into a list of words using a separator.",
    "Create a new dictionary with keys from an iterable.",
    "Convert a number or string to an integer.",
    "Open a file and return a stream.",
    "Sort the list in place in ascending order.",
    "Return a copy of the string with leading and trailing whitespace removed.",
    "Question: what is the capital of France? Answer: Paris.",
    "Machine learning models learn patterns from data.",
    "Fine-tuning adapts a pretrained model to a new task.",
]
# Special symbols keras-hub's tokenizers insist on, and each family's chat turn markers.
_SYMBOLS = {
    "gemma": ["<start_of_turn>", "<end_of_turn>"],
    "gemma3": ["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<img>"],
    "gemma4": ["<|turn>", "<turn|>", "<|image>", "<|image|>", "<image|>", "<|video|>"],
}


def train_sentencepiece(vocab_size: int = 384, gemma3: bool = True, family: str = "") -> bytes:
    """A BPE SentencePiece proto with Gemma's special ids: pad 0, eos 1, bos 2, unk 3."""
    import sentencepiece as spm

    buffer = io.BytesIO()
    symbols = _SYMBOLS[family or ("gemma3" if gemma3 else "gemma")]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS * 20),
        model_writer=buffer,
        vocab_size=vocab_size,
        # Gemma's own settings: BPE, no dummy prefix, no normalisation, byte fallback, split digits.
        model_type="bpe",
        add_dummy_prefix=False,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=symbols,
        byte_fallback=True,
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return buffer.getvalue()


def make_tiny_causal_lm(kind: str = "gemma3", seed: int = 0, vocab_size: int = 384):
    """Build a 2-layer random-weight `GemmaCausalLM` ("gemma") or `Gemma3CausalLM` ("gemma3"), or a tiny
    `Gemma4CausalLM`: "gemma4" (dense, 4 layers: per-layer inputs, the last two sharing key/value layers, global
    layers with their own head size and partial RoPE, as the 2B/4B) or "gemma4_moe" (mixture of experts beside
    the dense block, K=V global layers, as the 26B-A4B)."""
    import keras
    import keras_hub

    keras.utils.set_random_seed(seed)
    if kind == "gemma4_vision":
        return _tiny_gemma4_vision(vocab_size)
    if kind.startswith("gemma4"):
        return _tiny_gemma4(kind == "gemma4_moe", vocab_size)
    proto = train_sentencepiece(vocab_size, gemma3=kind == "gemma3")
    if kind == "gemma3":
        tokenizer = keras_hub.models.Gemma3Tokenizer(proto=proto, has_vision_tokens=False)
        backbone = keras_hub.models.Gemma3Backbone(
            vocabulary_size=tokenizer.vocabulary_size(),
            image_size=None,
            num_layers=2,
            num_query_heads=2,
            num_key_value_heads=1,
            hidden_dim=32,
            intermediate_dim=64,
            head_dim=16,
            use_post_ffw_norm=True,
            use_post_attention_norm=True,
            use_sliding_window_attention=True,
            sliding_window_size=64,
        )
        preprocessor = keras_hub.models.Gemma3CausalLMPreprocessor(tokenizer=tokenizer, sequence_length=64)
        return keras_hub.models.Gemma3CausalLM(backbone=backbone, preprocessor=preprocessor)
    if kind == "gemma":
        tokenizer = keras_hub.models.GemmaTokenizer(proto=proto)
        backbone = keras_hub.models.GemmaBackbone(
            vocabulary_size=tokenizer.vocabulary_size(),
            num_layers=2,
            num_query_heads=2,
            num_key_value_heads=1,
            hidden_dim=32,
            intermediate_dim=64,
            head_dim=16,
        )
        preprocessor = keras_hub.models.GemmaCausalLMPreprocessor(tokenizer=tokenizer, sequence_length=64)
        return keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=preprocessor)
    raise ValueError(f"unknown tiny model kind {kind!r}")


def _tiny_gemma4(moe: bool, vocab_size: int):
    import keras_hub
    import numpy as np

    tokenizer = keras_hub.models.Gemma4Tokenizer(proto=train_sentencepiece(vocab_size, family="gemma4"),
                                                 has_vision_tokens=False, has_video_tokens=False)
    shape = dict(num_query_heads=2, num_key_value_heads=1, hidden_dim=32, intermediate_dim=64, head_dim=16,
                 global_head_dim=32, sliding_window_size=16, sliding_window_pattern=2, final_logit_soft_cap=30.0,
                 global_rope_partial_rotary_factor=0.25)
    if moe:
        variant = dict(num_layers=2, enable_moe_block=True, num_experts=4, expert_intermediate_dim=16,
                       num_experts_per_token=2, num_global_key_value_heads=1)
    else:
        variant = dict(num_layers=4, num_kv_shared_layers=2, hidden_size_per_layer_input=8)
    backbone = keras_hub.models.Gemma4Backbone(vocabulary_size=tokenizer.vocabulary_size(), image_size=None,
                                               **shape, **variant)
    # Its attention initializer draws the same values for same-shaped kernels: key and value would be equal, and a
    # model that confused the two would pass every parity check. Apart they are.
    rng = np.random.default_rng(1)
    for variable in backbone.weights:
        if variable.path.endswith("value/kernel"):
            variable.assign(rng.normal(scale=0.2, size=variable.shape).astype(variable.dtype))
    preprocessor = keras_hub.models.Gemma4CausalLMPreprocessor(tokenizer=tokenizer, sequence_length=64,
                                                               image_converter=None)
    return keras_hub.models.Gemma4CausalLM(backbone=backbone, preprocessor=preprocessor)


def _tiny_gemma4_vision(vocab_size: int):
    """A multimodal Gemma 4 (a one-layer vision encoder beside the text decoder), as the Gemma 4 presets are."""
    import keras_hub

    tokenizer = keras_hub.models.Gemma4Tokenizer(proto=train_sentencepiece(vocab_size, family="gemma4"))
    vision = keras_hub.models.Gemma4VisionEncoder(image_size=28, patch_size=14, pool_size=1, num_layers=1, num_heads=2,
                                                  head_dim=8, num_key_value_heads=2, hidden_dim=16, intermediate_dim=32,
                                                  output_dim=32)
    backbone = keras_hub.models.Gemma4Backbone(vocabulary_size=tokenizer.vocabulary_size(), image_size=28, num_layers=2,
                                               num_query_heads=2, num_key_value_heads=1, hidden_dim=32,
                                               intermediate_dim=64, head_dim=16, vision_encoder=vision)
    preprocessor = keras_hub.models.Gemma4CausalLMPreprocessor(
        tokenizer=tokenizer, sequence_length=64, max_images_per_prompt=1, num_vision_tokens_per_image=4,
        image_converter=keras_hub.layers.Gemma4ImageConverter(image_size=(28, 28)))
    return keras_hub.models.Gemma4CausalLM(backbone=backbone, preprocessor=preprocessor)


def save_tiny_preset(path: Path, kind: str = "gemma3", seed: int = 0) -> Path:
    model = make_tiny_causal_lm(kind, seed)
    model.save_to_preset(str(path))
    return path
