"""The demo model's tokenizer alone, read from the GGUF file's metadata with the `gguf` package (numpy only) and
written as the SentencePiece model the GGUF file was made from: what preprocessing needs, without torch or
transformers. Hand-written because transformers' GGUF reader imports torch at module level (transformers 5)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from jobs.demo_model import COMPLETE, assemble_gguf, publish

log = logging.getLogger(__name__)

# keras-hub picks its converter from config.json's model_type; a tokenizer needs nothing else from it.
TOKENIZER_CONFIG = {"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"]}


def sentencepiece_from_gguf(gguf_path: Path) -> bytes:
    """The serialized SentencePiece model of a Gemma GGUF file. GGUF keeps SentencePiece's own pieces, scores and
    piece types (same numbering), so this is a faithful copy, not an approximation."""
    from gguf import GGUFReader
    from sentencepiece import sentencepiece_model_pb2 as sp

    fields = GGUFReader(str(gguf_path)).fields
    if fields["tokenizer.ggml.model"].contents() != "llama":  # llama.cpp's name for SentencePiece
        raise ValueError(f"{gguf_path}: not a SentencePiece tokenizer")
    tokens = fields["tokenizer.ggml.tokens"].contents()
    scores = fields["tokenizer.ggml.scores"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    unk = int(fields["tokenizer.ggml.unknown_token_id"].contents())
    model = sp.ModelProto()
    trainer = model.trainer_spec
    trainer.model_type = sp.TrainerSpec.BPE
    trainer.vocab_size = len(tokens)
    trainer.byte_fallback = True
    trainer.unk_id = unk
    trainer.bos_id = int(fields["tokenizer.ggml.bos_token_id"].contents())
    trainer.eos_id = int(fields["tokenizer.ggml.eos_token_id"].contents())
    trainer.pad_id = int(fields["tokenizer.ggml.padding_token_id"].contents())
    # SentencePiece finds its special ids by piece name, so the names must be the file's own.
    trainer.unk_piece, trainer.bos_piece = tokens[trainer.unk_id], tokens[trainer.bos_id]
    trainer.eos_piece, trainer.pad_piece = tokens[trainer.eos_id], tokens[trainer.pad_id]
    add_prefix = bool(fields["tokenizer.ggml.add_space_prefix"].contents())
    for spec in (model.normalizer_spec, model.denormalizer_spec):
        spec.name = "identity"
        spec.add_dummy_prefix = add_prefix
        spec.escape_whitespaces = True
        spec.remove_extra_whitespaces = False
    piece = sp.ModelProto.SentencePiece
    control = {trainer.bos_id, trainer.eos_id, trainer.pad_id}
    for index, (token, score, kind) in enumerate(zip(tokens, scores, types, strict=True)):
        # llama.cpp marks all of Gemma's special tokens CONTROL, which SentencePiece never matches in text; in
        # Gemma's own tokenizer only bos, eos and pad are (a prompt's "<start_of_turn>" is one token), and unk is
        # SentencePiece's one UNKNOWN piece. llama.cpp also stores user-defined pieces with plain spaces where
        # SentencePiece matches its escaped "▁".
        if index == unk:
            kind = piece.UNKNOWN
        elif kind == piece.CONTROL and index not in control:
            kind = piece.USER_DEFINED
        if kind == piece.USER_DEFINED:
            token = token.replace(" ", "\u2581")
        model.pieces.add(piece=token, score=float(score), type=kind)
    return model.SerializeToString()


def build_tokenizer_dir(target: Path) -> Path:
    if (target / COMPLETE).exists():
        return target
    gguf_path = assemble_gguf()
    staging = target.with_name(f"{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    publish(staging, target, dict(TOKENIZER_CONFIG), sentencepiece_from_gguf(gguf_path))
    gguf_path.unlink(missing_ok=True)
    log.info("built the demo tokenizer at %s", target)
    return target
