"""The demo tokenizer read from GGUF metadata alone: a SentencePiece model written to GGUF the way llama.cpp's
converter writes Gemma's (special tokens CONTROL, user-defined pieces with plain spaces) reads back into a
SentencePiece model that tokenizes exactly like the original. The real demo file: tests/jobs/convert/test_gguf_import.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_models import train_sentencepiece

TEXTS = [
    "What does os.path.join do?",
    "Hello  world\n\ttabs é 漢字 🙂 1234567",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "    indented    code   ",
    "<bos>literal specials<eos>",
]
LLAMA_CPP_CONTROL = {"<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"}


def write_gguf_like_llama_cpp(proto: bytes, path: Path) -> None:
    from gguf import GGUFWriter
    from sentencepiece import sentencepiece_model_pb2 as sp

    model = sp.ModelProto.FromString(proto)
    tokens, scores, types = [], [], []
    for piece in model.pieces:
        kind = 3 if piece.piece in LLAMA_CPP_CONTROL else int(piece.type)
        tokens.append(piece.piece.replace("\u2581", " ") if kind == 4 else piece.piece)
        scores.append(piece.score)
        types.append(kind)
    writer = GGUFWriter(str(path), "gemma3")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_space_prefix(False)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def protos(tmp_path_factory) -> tuple[bytes, bytes]:
    from jobs.demo_model.tokenizer import sentencepiece_from_gguf

    original = train_sentencepiece()
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf_like_llama_cpp(original, path)
    return original, sentencepiece_from_gguf(path)


def test_the_gguf_tokenizer_encodes_and_decodes_like_the_original(protos):
    import sentencepiece as spm

    original, rebuilt = (spm.SentencePieceProcessor(model_proto=p) for p in protos)
    assert rebuilt.vocab_size() == original.vocab_size()
    for text in TEXTS:
        assert rebuilt.encode(text) == original.encode(text), text
        assert rebuilt.decode(rebuilt.encode(text)) == text
    assert rebuilt.encode("<start_of_turn>") == [original.piece_to_id("<start_of_turn>")]
    assert (rebuilt.unk_id(), rebuilt.bos_id(), rebuilt.eos_id(), rebuilt.pad_id()) == (3, 2, 1, 0)


def test_the_tokenizer_directory_loads_in_keras_hub_without_torch(protos, tmp_path, monkeypatch):
    import subprocess
    import sys

    from jobs.demo_model import SENTENCEPIECE
    from jobs.demo_model.tokenizer import TOKENIZER_CONFIG

    (tmp_path / SENTENCEPIECE).write_bytes(protos[1])
    (tmp_path / "config.json").write_text(__import__("json").dumps(TOKENIZER_CONFIG))
    # A fresh process with torch and transformers made unimportable, as in the preprocess image.
    code = (
        "import sys\n"
        "class Blocked:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'transformers'):\n"
        "            raise ImportError(f'{name} is not in the preprocess image')\n"
        "sys.meta_path.insert(0, Blocked())\n"
        "from jobs.common.sources import load_tokenizer\n"
        f"tok = load_tokenizer({str(tmp_path)!r}, __import__('pathlib').Path('.'))\n"
        f"print(type(tok).__name__, [int(t) for t in tok({TEXTS[2]!r})])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**__import__("os").environ, "KERAS_BACKEND": "jax"})
    assert result.returncode == 0, result.stderr[-2000:]
    import sentencepiece as spm

    expected = spm.SentencePieceProcessor(model_proto=protos[0]).encode(TEXTS[2])
    assert result.stdout.split("\n")[-2] == f"Gemma3Tokenizer {expected}"
