"""Our two tokenizers give transformers' ids and text on multilingual strings; special ids from the files."""
import pytest

from model import BPETokenizer, CheckpointError, SentencePieceTokenizer, load_tokenizer

transformers = pytest.importorskip("transformers")

STRINGS = ["Hello world", "你好，世界！今天天气很好。", "こんにちは、世界。カタカナと漢字",
           "emoji 👍🏽🎉 and 🦜 (unseen)", "digits 1234567 3.14 0042", "whitespace   runs\n\n\t  and\r\n end   ",
           "Mixed 中文 English 日本語 123 😀", "  leading spaces", "", "Ünïcödé NFC: e\u0301 vs \u00e9"]


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
    # the dummy prefix + the two spaces: three "▁" marks before "leading", whatever the merges
    assert "".join(ours.sp.encode(s, out_type=str)) == "▁▁▁leading▁spaces"
    assert ours.decode(ours.encode(s)) == s
    assert ref.decode(ref(s, add_special_tokens=False).input_ids) == " leading spaces"   # one space lost
    # everywhere else the two agree: a space after the start is no problem
    assert ours.encode("x  leading spaces") == ref("x  leading spaces", add_special_tokens=False).input_ids


def test_byte_fallback_round_trip(vicuna_dir):
    ours = load_tokenizer(vicuna_dir)
    s = "🦜 unseen 鹦鹉"  # characters absent from the training corpus go through byte pieces
    assert ours.decode(ours.encode(s)) == s


def test_missing_tokenizer_is_clear(tmp_path):
    with pytest.raises(CheckpointError, match="tokenizer.model.*tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
