"""The assembled speech LLM: prompts and labels, the loss, the two passes, checkpoints, frozen parts."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from lora import lora_modules
from model import (PROMPTS, BEATsConfig, CheckpointError, LLMConfig, Prompter, QFormerConfig, SpeechLLM,
                   SpeechLLMConfig, WhisperEncoderConfig, load_tokenizer, split_prompt)


def vocab_size(tok):
    return tok.tok.get_vocab_size() if hasattr(tok, "tok") else tok.sp.get_piece_size()


def tiny_speech_llm(tok_dir, family, hidden=32, layers=3, seed=0, beats=True):
    tok = load_tokenizer(tok_dir)
    llm = LLMConfig(vocab_size=vocab_size(tok), hidden_size=hidden, intermediate_size=48, num_hidden_layers=layers,
                    num_attention_heads=4, num_key_value_heads=2, qkv_bias=family == "qwen2", family=family)
    whisper = WhisperEncoderConfig(d_model=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32)
    bcfg = BEATsConfig(input_patch_size=16, embed_dim=8, encoder_layers=1, encoder_embed_dim=12,
                       encoder_ffn_embed_dim=24, encoder_attention_heads=2, deep_norm=True, conv_pos=8,
                       conv_pos_groups=2, relative_position_embedding=True, num_buckets=16, max_distance=32,
                       gru_rel_pos=True) if beats else None
    q = QFormerConfig(speech_dim=16, audio_dim=12 if beats else 0, llm_hidden=hidden, hidden=16, n_head=2, ffn=32)
    torch.manual_seed(seed)
    m = SpeechLLM(SpeechLLMConfig(llm=llm, whisper=whisper, beats=bcfg, qformer=q), tok)
    with torch.no_grad():   # B starts at zero; a non-zero B makes LoRA's effect visible in the tests
        for mod in lora_modules(m.llm).values():
            mod.lora_B.weight.normal_(0, 0.1)
    return m.eval()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request, vicuna_dir, qwen_dir):
    return tiny_speech_llm(vicuna_dir if request.param == "llama" else qwen_dir, request.param)


def audio_features(B=2, seconds=(1.0, 3.0), seed=0):
    g = torch.Generator().manual_seed(seed)
    mel = torch.randn(B, 80, 3000, generator=g)
    N = int(max(seconds) * 16000)
    fbank = torch.randn(B, 1 + (N - 400) // 160, 128, generator=g)
    mask = torch.arange(N)[None] >= torch.tensor([int(s * 16000) for s in seconds])[:, None]
    return mel, fbank, mask


INSTR = ["Listen to the speech and translate it into Chinese.", "Recognize the speech and give me the transcription."]
TARGETS = ["你好，世界！", "hello world, this is a test"]


def test_audio_gives_88_speech_tokens(tiny):
    mel, fbank, mask = audio_features()
    speech = tiny.encode_speech(mel, fbank, mask)
    assert speech.shape == (2, 88, tiny.config.llm.hidden_size)


def test_labels_cover_only_target_and_end(tiny):
    p = tiny.prompter
    b = p.build(INSTR, [88, 88], TARGETS)
    for i, t in enumerate(TARGETS):
        lab = b.labels[i][b.labels[i] != -100].tolist()
        assert lab == tiny.tokenizer.encode(t) + [p.end_id]
        # the labelled span is the end of the row's real tokens
        n_real = int(b.attention_mask[i].sum())
        assert (b.labels[i, n_real - len(lab):n_real] != -100).all()
        assert (b.labels[i, n_real:] == -100).all() and (b.labels[i, :n_real - len(lab)] == -100).all()


def test_speech_embeddings_sit_where_speechhere_was(tiny):
    p = tiny.prompter
    before, after = split_prompt(PROMPTS[tiny.config.llm.family])
    speech = torch.randn(2, 88, tiny.config.llm.hidden_size)
    b = p.build(INSTR, [88, 88], TARGETS)
    x = tiny._embed(b, speech)
    start = len(p.before_ids)
    assert torch.equal(x[:, start:start + 88], speech)
    assert b.slot_mask[:, start:start + 88].all() and b.slot_mask.sum() == 2 * 88
    # the tokens before the slot are BOS (Vicuna) and exactly the template's text before <SpeechHere>
    ids = b.input_ids[0, :start].tolist()
    if tiny.tokenizer.bos_id is not None:
        assert ids[0] == tiny.tokenizer.bos_id
        ids = ids[1:]
    assert ids == tiny.tokenizer.encode(before)
    n_after = len(tiny.tokenizer.encode(after.format(instruction=INSTR[0])))
    assert b.input_ids[0, start + 88:start + 88 + n_after].tolist() == tiny.tokenizer.encode(after.format(instruction=INSTR[0]))


# Comparisons of two paths through our own code run in float64 and agree to ~1e-10.
@pytest.fixture(scope="module")
def tiny64(tiny):
    return copy.deepcopy(tiny).double()


def test_loss_equals_hand_computed_ce(tiny64):
    tiny = tiny64
    speech = torch.randn(2, 88, tiny.config.llm.hidden_size, dtype=torch.float64)
    out = tiny.speech_pass(speech, INSTR, TARGETS)
    b = tiny.prompter.build(INSTR, [88, 88], TARGETS)
    with torch.no_grad():
        logits = tiny.llm(inputs_embeds=tiny._embed(b, speech), attention_mask=b.attention_mask).logits
    shift_logits, shift_labels = logits[:, :-1], b.labels[:, 1:]
    ref = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100)
    assert_close(out.loss, ref.float(), rtol=1e-6, atol=0)   # our CE is computed on float32 logits, by design
    for i in range(2):
        valid = shift_labels[i] != -100
        assert_close(out.row_loss[i], F.cross_entropy(shift_logits[i][valid], shift_labels[i][valid]).float(),
                     rtol=1e-6, atol=0)


def test_padded_batch_gives_each_rows_loss(tiny64):
    tiny = tiny64
    speech = torch.randn(2, 88, tiny.config.llm.hidden_size, dtype=torch.float64)
    batched = tiny.speech_pass(speech, INSTR, TARGETS, layers=[0, 2])
    for i in range(2):
        alone = tiny.speech_pass(speech[i:i + 1], INSTR[i:i + 1], TARGETS[i:i + 1], layers=[0, 2])
        assert_close(batched.row_loss[i], alone.loss, rtol=1e-6, atol=0)   # float32 CE of float64 states
        for l in (0, 2):
            assert_close(batched.hidden_states[l][i], alone.hidden_states[l][0], rtol=1e-10, atol=1e-10)


def test_speech_hidden_states_at_speech_positions(tiny64):
    tiny = tiny64
    speech = torch.randn(2, 88, tiny.config.llm.hidden_size, dtype=torch.float64)
    out = tiny.speech_pass(speech, INSTR, TARGETS, layers=[0, 1])
    assert torch.equal(out.hidden_states[0], speech)   # layer 0 = the embeddings = the speech itself
    assert out.hidden_states[1].shape == (2, 88, tiny.config.llm.hidden_size) and out.mask.all()
    # without targets (layer selection) the pass stops after the speech: same states, no loss
    short = tiny.speech_pass(speech, INSTR, layers=[0, 1])
    assert short.loss is None
    assert_close(short.hidden_states[1], out.hidden_states[1], rtol=1e-10, atol=1e-10)


def test_text_pass_equals_full_pass(tiny64):
    tiny = tiny64
    transcripts = ["hello world", "this is a test of the tokenizer, it's fine"]
    L = tiny.config.llm.num_hidden_layers
    text = tiny.text_pass(transcripts, INSTR, layers=[0, 1, 2])
    ids = [tiny.tokenizer.encode(t) for t in transcripts]
    full = tiny.prompter.build(INSTR, ids, TARGETS)   # whole prompt + target, every layer, logits
    with torch.no_grad():
        ref = tiny.llm(input_ids=full.input_ids, attention_mask=full.attention_mask, output_layers=range(L + 1))
    start = len(tiny.prompter.before_ids)
    for i, n in enumerate(len(x) for x in ids):
        assert text.mask[i].sum() == n and text.mask[i, :n].all()
        for l in (0, 1, 2):
            assert_close(text.hidden_states[l][i, :n], ref.hidden_states[l][i, start:start + n], rtol=1e-10, atol=1e-10)
    assert not any(h.requires_grad for h in text.hidden_states.values())


def test_text_pass_stops_after_highest_layer(tiny):
    calls = []
    hooks = [blk.register_forward_hook(lambda *a, j=j: calls.append(j)) for j, blk in enumerate(tiny.llm.model.layers)]
    try:
        tiny.text_pass(["hello world"], INSTR[:1], layers=[0, 1])
    finally:
        for h in hooks:
            h.remove()
    assert calls == [0]


def test_one_step_changes_only_trainable_parameters(vicuna_dir):
    m = tiny_speech_llm(vicuna_dir, "llama", seed=1).train()
    trainable = set(m.trainable_names())
    assert trainable and all(n.startswith("bridge.") or ".lora_" in n for n in trainable)
    assert any(".lora_A." in n for n in trainable) and any(n.startswith("bridge.speech_Qformer") for n in trainable)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    mel, fbank, mask = audio_features()
    out = m.speech_pass(m.encode_speech(mel, fbank, mask), INSTR, TARGETS)
    out.loss.backward()
    opt.step()
    grads = {n: p.grad for n, p in m.named_parameters()}
    for n, p in m.named_parameters():
        changed = not torch.equal(p, before[n])
        if n not in trainable:
            assert not changed and grads[n] is None, n
        elif grads[n].abs().sum() > 0:
            assert changed, n
        else:
            # with one query per window, the Q-Former's self-attention is a softmax over one key (== 1):
            # its query and key projections get exactly zero gradient, as in SALMONN
            assert ".attention.self.query." in n or ".attention.self.key." in n, n
    assert sum(g.abs().sum() > 0 for n, g in grads.items() if n in trainable) > len(trainable) // 2
    # the encoders stayed frozen through .train() (they have no dropout: train mode changes nothing there)
    assert m.bridge.training and not any(p.requires_grad for p in m.speech_encoder.parameters())


def test_generate_batch_equals_rows(tiny):
    speech = torch.randn(2, 88, tiny.config.llm.hidden_size)
    both = tiny.generate(speech, INSTR, num_beams=2, max_new_tokens=6)
    assert len(both) == 2 and all(isinstance(s, str) for s in both)
    for i in range(2):
        assert tiny.generate(speech[i:i + 1], INSTR[i:i + 1], num_beams=2, max_new_tokens=6) == [both[i]]


def test_own_checkpoint_round_trip(tmp_path, vicuna_dir):
    a = tiny_speech_llm(vicuna_dir, "llama", seed=1)
    b = tiny_speech_llm(vicuna_dir, "llama", seed=2)
    a.save_trainable(tmp_path / "ckpt", meta={"step": 3})
    b.load_trainable(tmp_path / "ckpt")
    sa, sb = a.trainable_state_dict(), b.trainable_state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def salmonn_layout(model: SpeechLLM) -> dict:
    """SALMONN's checkpoint layout (models/salmonn.py, peft 0.3), with `model`'s trainable values: the bridge's
    keys at the top, LoRA under llama_model.base_model.model.*.default, and the buffers its runner saves."""
    sd = {"speech_Qformer.bert.embeddings.position_ids": torch.arange(512).expand(1, -1)}
    for k, v in model.trainable_state_dict().items():
        if k.startswith("bridge."):
            sd[k.removeprefix("bridge.")] = v.clone()
        else:
            k = k.removeprefix("llm.").replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
            sd["llama_model.base_model.model." + k] = v.clone()
    for i in range(model.config.llm.num_hidden_layers):
        sd[f"llama_model.base_model.model.model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(2)
    return sd


def test_salmonn_checkpoint_loads(tmp_path, vicuna_dir):
    a = tiny_speech_llm(vicuna_dir, "llama", seed=1)
    b = tiny_speech_llm(vicuna_dir, "llama", seed=2)
    sd = salmonn_layout(a)
    torch.save({"model": sd, "epoch": 3}, tmp_path / "salmonn_tiny.pth")
    b.load_trainable(tmp_path / "salmonn_tiny.pth")
    sa, sb = a.trainable_state_dict(), b.trainable_state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(b.llm.model.layers[1].self_attn.v_proj.lora_B.weight,
                       sd["llama_model.base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight"])


@pytest.mark.parametrize("edit,error", [
    # trained for another LLM width: the projection and LoRA do not fit
    (lambda sd: sd.update({"speech_llama_proj.weight": torch.randn(40, 16)}),
     r"salmonn\.pth: key bridge\.speech_llama_proj\.weight has shape \(40, 16\), but the model expects \(32, 16\)"),
    (lambda sd: sd.update({"llama_model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight":
                           torch.randn(8, 40)}),
     r"key llm\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight has shape \(8, 40\), but the model expects \(8, 32\)"),
    (lambda sd: sd.pop("ln_audio.bias"), r"salmonn\.pth: missing key\(s\) for SpeechLLM: bridge\.ln_audio\.bias"),
    (lambda sd: sd.pop("llama_model.base_model.model.model.layers.1.self_attn.q_proj.lora_B.default.weight"),
     r"missing key\(s\) for SpeechLLM: llm\.model\.layers\.1\.self_attn\.q_proj\.lora_B\.weight"),
    # the text FFN SALMONN deletes, and a frozen encoder weight, are not trainable weights of this model
    (lambda sd: sd.update({"speech_Qformer.bert.encoder.layer.0.intermediate.dense.weight": torch.randn(32, 16)}),
     r"unexpected key\(s\) for SpeechLLM: bridge\.speech_Qformer\.bert\.encoder\.layer\.0\.intermediate"),
    (lambda sd: sd.update({"speech_encoder.conv1.weight": torch.randn(1)}),
     r"key\(s\) of frozen weights in a trainable-weights checkpoint: speech_encoder\.conv1\.weight"),
])
def test_salmonn_checkpoint_errors_name_the_key(tmp_path, vicuna_dir, edit, error):
    m = tiny_speech_llm(vicuna_dir, "llama", seed=1)
    sd = salmonn_layout(m)
    edit(sd)
    torch.save({"model": sd}, tmp_path / "salmonn.pth")
    with pytest.raises(CheckpointError, match=error):
        m.load_trainable(tmp_path / "salmonn.pth")


def test_salmonn_checkpoint_with_beats_into_a_whisper_only_model(tmp_path, vicuna_dir):
    torch.save({"model": salmonn_layout(tiny_speech_llm(vicuna_dir, "llama"))}, tmp_path / "salmonn.pth")
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\) for SpeechLLM: bridge\.ln_audio\.bias, "
                                              r"bridge\.ln_audio\.weight"):
        tiny_speech_llm(vicuna_dir, "llama", beats=False).load_trainable(tmp_path / "salmonn.pth")


def test_checkpoint_for_another_llm_size_is_refused(tmp_path, vicuna_dir):
    small = tiny_speech_llm(vicuna_dir, "llama", hidden=32)
    big = tiny_speech_llm(vicuna_dir, "llama", hidden=48)
    small.save_trainable(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="hidden_size=32"):
        big.load_trainable(tmp_path / "ckpt")
    torch.save({"model": {k.removeprefix("bridge."): v for k, v in small.trainable_state_dict().items()
                          if k.startswith("bridge.")}}, tmp_path / "s.pth")
    with pytest.raises(ValueError, match="speech_llama_proj"):
        big.load_trainable(tmp_path / "s.pth")
    with pytest.raises(CheckpointError, match="no such"):
        big.load_trainable(tmp_path / "nowhere")


def test_bad_prompts_and_transcripts(tiny, vicuna_dir):
    with pytest.raises(ValueError, match="tokenizes to nothing"):
        tiny.text_pass([""], INSTR[:1], layers=[0])
    with pytest.raises(ValueError, match="<SpeechHere>"):
        Prompter(load_tokenizer(vicuna_dir), "llama", prompt="USER: {instruction}\nASSISTANT:")
    with pytest.raises(ValueError, match="exactly one <SpeechHere>"):
        split_prompt("<SpeechHere><SpeechHere>")
    with pytest.raises(ValueError, match="tokenizes to nothing"):
        tiny.speech_pass(torch.randn(1, 88, tiny.config.llm.hidden_size), INSTR[:1], [""])


def test_config_mismatch_is_clear(vicuna_dir):
    m = tiny_speech_llm(vicuna_dir, "llama")
    d = m.config.to_dict()
    d["qformer"]["llm_hidden"] = 7
    with pytest.raises(ValueError, match="qformer.llm_hidden is 7"):
        SpeechLLMConfig.from_dict(d)


def test_from_pretrained_public_layouts(tmp_path, tiny_ckpts, capsys):
    from conftest import TINY_QFORMER
    m = SpeechLLM.from_pretrained(tiny_ckpts["llm"], tiny_ckpts["whisper"], tiny_ckpts["beats"],
                                  dtype=torch.float32, qformer=TINY_QFORMER)
    assert "trainable parameters" in capsys.readouterr().out
    assert m.config.llm.family == "qwen2" and m.config.qformer.audio_dim == 32
    mel, fbank, mask = audio_features()
    speech = m.encode_speech(mel, fbank, mask)
    assert speech.shape == (2, 88, 32)
    m.save_trainable(tmp_path / "ckpt", meta={"step": 1})
    info = SpeechLLM.checkpoint_info(tmp_path / "ckpt")
    assert info["sources"]["llm"] == str(tiny_ckpts["llm"]) and info["meta"] == {"step": 1}
    again = SpeechLLM.from_pretrained(tiny_ckpts["llm"], tiny_ckpts["whisper"], tiny_ckpts["beats"],
                                      ckpt=tmp_path / "ckpt", dtype=torch.float32, verbose=False)
    assert again.config == m.config   # the bridge's and LoRA's shape come from the checkpoint
    assert_close(again.encode_speech(mel, fbank, mask), speech)


def test_loaded_checkpoint_keeps_the_trainable_set(tmp_path, vicuna_dir):
    a = tiny_speech_llm(vicuna_dir, "llama", seed=1)
    a.save_trainable(tmp_path / "ckpt")
    b = tiny_speech_llm(vicuna_dir, "llama", seed=2)
    names = b.trainable_names()
    b.load_trainable(tmp_path / "ckpt")
    assert b.trainable_names() == names
    assert all(p.dtype == torch.float32 for n, p in b.named_parameters() if p.requires_grad)
    from safetensors.torch import load_file, save_file
    sd = load_file(tmp_path / "ckpt" / "trainable.safetensors")
    del sd["bridge.speech_llama_proj.bias"]
    save_file(sd, tmp_path / "ckpt" / "trainable.safetensors")
    with pytest.raises(CheckpointError, match=r"missing key\(s\).*bridge\.speech_llama_proj\.bias"):
        b.load_trainable(tmp_path / "ckpt")
