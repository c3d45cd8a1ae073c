"""Our two tokenizers give transformers' ids and text on multilingual strings; special ids from the files."""
import json

import pytest

from model import BPETokenizer, SentencePieceTokenizer, load_tokenizer

transformers = pytest.importorskip("transformers")

# Qwen2's pre-tokenizer split (tokenizer.json of Qwen/Qwen2-7B)
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
CORPUS = ["Hello world, this is a test of the tokenizer. It's fine, isn't it?",
          "你好，世界！今天天气很好。我们去公园散步吧。",
          "こんにちは、世界。カタカナとひらがなと漢字。",
          "Numbers: 12345, 3.14159 and 2024-11-21.",
          "emoji 👍🏽🎉 ok 😀", "tabs\tand   spaces\n\nnew lines"] * 10
STRINGS = ["Hello world", "你好，世界！今天天气很好。", "こんにちは、世界。カタカナと漢字",
           "emoji 👍🏽🎉 and 🦜 (unseen)", "digits 1234567 3.14 0042", "whitespace   runs\n\n\t  and\r\n end   ",
           "Mixed 中文 English 日本語 123 😀", "  leading spaces", "", "Ünïcödé NFC: e\u0301 vs \u00e9"]


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
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


@pytest.fixture(scope="module")
def vicuna_dir(tmp_path_factory):
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


def test_qwen2_ids_and_text_equal_transformers(qwen_dir):
    ours = load_tokenizer(qwen_dir)
    assert isinstance(ours, BPETokenizer)
    ref = transformers.AutoTokenizer.from_pretrained(qwen_dir)
    for s in STRINGS + ["<|im_start|>user\nhi 你好<|im_end|>\n<|im_start|>assistant\n"]:
        ids = ours.encode(s)
        assert ids == ref(s, add_special_tokens=False).input_ids, s
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), s
    # byte-level BPE is lossless on text without special tokens (after NFC)
    import unicodedata
    for s in STRINGS:
        assert ours.decode(ours.encode(s)) == unicodedata.normalize("NFC", s)


def test_qwen2_special_ids(qwen_dir):
    ours = load_tokenizer(qwen_dir)
    ref = transformers.AutoTokenizer.from_pretrained(qwen_dir)
    assert ours.bos_id is None and ours.encode("hi", bos=True) == ours.encode("hi")  # Qwen2 has no BOS
    assert ours.eos_id == ref.eos_token_id == ours.token_id("<|endoftext|>")
    assert ours.pad_id == ref.pad_token_id
    assert ours.encode("<|im_end|>") == [ours.token_id("<|im_end|>")]
    with pytest.raises(ValueError, match="not in the vocabulary"):
        ours.token_id("<|audio_bos|>")   # Qwen2-7B's tokenizer has no audio tokens


def test_vicuna_ids_and_text_equal_transformers(vicuna_dir):
    ours = load_tokenizer(vicuna_dir)
    assert isinstance(ours, SentencePieceTokenizer)
    ref = transformers.LlamaTokenizer.from_pretrained(vicuna_dir)
    for s in STRINGS:
        if s.startswith(" "):
            continue  # see test_vicuna_leading_whitespace_follows_sentencepiece
        ids = ours.encode(s)
        assert ids == ref(s, add_special_tokens=False).input_ids, s
        assert ours.encode(s, bos=True) == ref(s).input_ids, s   # HF adds BOS by default for Llama
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), s
    assert (ours.bos_id, ours.eos_id) == (ref.bos_token_id, ref.eos_token_id) == (1, 2)
    assert ours.decode([1] + ours.encode("Hello world") + [2]) == "Hello world"
    assert ours.pad_id == 0  # no pad piece: <unk>, masked anyway


def test_vicuna_leading_whitespace_follows_sentencepiece(vicuna_dir):
    """Text that starts with spaces: SentencePiece (what Vicuna was trained with, and what SALMONN's slow
    LlamaTokenizer called) always adds its dummy-prefix piece; transformers 5's converted tokenizer skips
    it when the text already starts with a space, and then loses one space on the round trip. We follow
    SentencePiece."""
    ours = load_tokenizer(vicuna_dir)
    ref = transformers.LlamaTokenizer.from_pretrained(vicuna_dir)
    s = "  leading spaces"
    assert ours.sp.encode(s, out_type=str)[:3] == ["▁", "▁", "▁l"]
    assert ours.decode(ours.encode(s)) == s
    assert ref.decode(ref(s, add_special_tokens=False).input_ids) == " leading spaces"   # one space lost
    # everywhere else the two agree: a space after the start is no problem
    assert ours.encode("x  leading spaces") == ref("x  leading spaces", add_special_tokens=False).input_ids


def test_byte_fallback_round_trip(vicuna_dir):
    ours = load_tokenizer(vicuna_dir)
    s = "🦜 unseen 鹦鹉"  # characters absent from the training corpus go through byte pieces
    assert ours.decode(ours.encode(s)) == s


def test_missing_tokenizer_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.model.*tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
