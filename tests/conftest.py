"""Shared test set-up: never touch the network, keep CPU runs deterministic and small."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import sys
from pathlib import Path

# the project's modules are flat files at the repository root
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import json

import pytest

# ---------------------------------------------------------------- tiny tokenizers in the real formats

# Qwen2's pre-tokenizer split (tokenizer.json of Qwen/Qwen2-7B)
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
CORPUS = ["Hello world, this is a test of the tokenizer. It's fine, isn't it?",
          "你好，世界！今天天气很好。我们去公园散步吧。",
          "こんにちは、世界。カタカナとひらがなと漢字。",
          "Numbers: 12345, 3.14159 and 2024-11-21.",
          "emoji 👍🏽🎉 ok 😀", "tabs\tand   spaces\n\nnew lines",
          "USER: <Speech></Speech> Listen to the speech and translate it into Chinese.\nASSISTANT:",
          "<|audio_bos|><|audio_eos|> You are a helpful assistant. Recognize the speech and give me the transcription.",
          ] * 10


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory):
    """A tiny byte-level BPE tokenizer.json built like Qwen2's (NFC, Qwen2's split regex, ByteLevel)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    d = tmp_path_factory.mktemp("qwen_tok")
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=420, special_tokens=special,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "errors": "replace"}))
    return d


@pytest.fixture(scope="session")
def vicuna_dir(tmp_path_factory):
    """A tiny SentencePiece tokenizer.model trained with Llama's settings."""
    import sentencepiece as spm
    d = tmp_path_factory.mktemp("vicuna_tok")
    (d / "corpus.txt").write_text("\n".join(CORPUS))
    # Llama's SentencePiece settings: BPE, byte fallback, digits split, no normalisation, dummy prefix
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=0.9995, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2)
    # Vicuna-13B-v1.1's tokenizer_config.json; its config.json (not written here) says bos 0 / eos 1, wrongly
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False}))
    return d
