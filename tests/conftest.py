"""Shared test set-up: never touch the network, keep CPU runs deterministic and small."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

# One torch thread unless the environment asks for more (OMP_NUM_THREADS): on a 2-core machine two threads
# made the suite 5.5x slower, and single-threaded float arithmetic is reproducible run to run.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)

import sys
from pathlib import Path

# the project's modules are flat files at the repository root
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import json

import pytest


# ---------------------------------------------------------------- slow tests (the toy chain): --slow runs them

def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run the tests marked slow (minutes: the toy chain)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: minutes long; skipped unless pytest is given --slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with `pytest tests/ --slow -m slow`")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)

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


# ---------------------------------------------------------------- tiny checkpoints in the public layouts

TINY_QFORMER = dict(hidden=16, n_head=2, ffn=32)


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory, qwen_dir):
    """An HF Qwen2 directory (+ tokenizer), an HF Whisper directory and an official BEATs pickle, tiny."""
    import shutil
    from pathlib import Path

    import torch
    import transformers

    d = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    vocab = json.loads((qwen_dir / "tokenizer.json").read_text())["model"]["vocab"]
    n_vocab = len(vocab) + 3    # + the three special tokens
    llm = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=n_vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False))
    llm.save_pretrained(d / "qwen2")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(qwen_dir / f, d / "qwen2" / f)
    whisper = transformers.WhisperModel(transformers.WhisperConfig(
        d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=80, max_source_positions=1500, vocab_size=100,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=3))
    whisper.save_pretrained(d / "whisper")
    beats = Path(__file__).parent / "data" / "beats_tiny.pt"
    return {"llm": d / "qwen2", "whisper": d / "whisper", "beats": beats}
