"""One joint-stage training step of the speech LLM, ours against a SALMONN-style build from transformers + peft.

    python benchmarks/bench_speech_llm.py                       # small speech LLM on the CPU, batch 2 x 30 s
    python benchmarks/bench_speech_llm.py --device cuda --real-size --batch 8    # qwen2-7b preset, random bf16

A step = frozen encoders -> Q-Former -> speech pass (CE) + text pass to layer 1 (no grad) -> OT loss at
layers {0, 1} -> Eq. (6) -> backward -> AdamW step. Both builds share every weight:
  ours: model.SpeechLLM (our Whisper, BEATs, Q-Former, LLM with our LoRA; the LM head only on the target
        positions; the text pass stops after layer 1 and after the transcript);
  HF:   transformers' WhisperEncoder and Qwen2ForCausalLM with peft LoRA (q_proj, v_proj, r=8), our BEATs and
        Q-Former (transformers has neither); the LM head and loss on every position (labels=...), the hidden
        states from output_hidden_states=True, the text pass a full forward under no_grad.
It prints the step time of each, the share of our text pass, and as its last line
`step_ratio=<ours/HF> text_pass_share=<ours text pass / ours step>`.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import sinkhorn  # noqa: E402
from lora import lora_modules  # noqa: E402
from model import (BEATsConfig, LLMConfig, QFormerConfig, SpeechLLM, SpeechLLMConfig,  # noqa: E402
                   Tokenizer, WhisperEncoderConfig)

ALPHA = 0.99   # Eq. (6): OT weight 1 - alpha = 0.01 (Sec. 5.2)
LAYERS = [0, 1]


class ByteTokenizer(Tokenizer):
    """A stand-in tokenizer (one id per UTF-8 byte + specials) so the benchmark needs no files."""
    bos_id, eos_id, pad_id = None, 256, 256
    SPECIAL = {"<|endoftext|>": 256, "<|im_start|>": 257, "<|im_end|>": 258}

    def encode(self, text, bos=False):
        out, i = [], 0
        while i < len(text):
            for s, t in self.SPECIAL.items():
                if text.startswith(s, i):
                    out.append(t)
                    i += len(s)
                    break
            else:
                out.extend(text[i].encode())
                i += 1
        return out

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode(errors="replace")

    def token_id(self, token):
        return self.SPECIAL[token]


def build(real_size: bool, device, dtype):
    if real_size:
        llm = LLMConfig.from_name("qwen2-7b")
        whisper = WhisperEncoderConfig.from_name("whisper-large-v2")
        beats = BEATsConfig.from_name("beats-iter3-plus-as2m-cpt2")
    else:
        llm = LLMConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=4, qkv_bias=True, rope_theta=1e6, family="qwen2")
        whisper = WhisperEncoderConfig(d_model=384, encoder_layers=4, encoder_attention_heads=6, encoder_ffn_dim=1536)
        beats = BEATsConfig(input_patch_size=16, embed_dim=512, encoder_layers=2, encoder_embed_dim=384,
                            encoder_ffn_embed_dim=1536, encoder_attention_heads=6, deep_norm=True, conv_pos=128,
                            conv_pos_groups=16, relative_position_embedding=True, num_buckets=320,
                            max_distance=800, gru_rel_pos=True)
    q = QFormerConfig(speech_dim=whisper.d_model, audio_dim=beats.encoder_embed_dim, llm_hidden=llm.hidden_size)
    cfg = SpeechLLMConfig(llm=llm, whisper=whisper, beats=beats, qformer=q)
    torch.manual_seed(0)
    with torch.device(device):
        model = SpeechLLM(cfg, ByteTokenizer())
    for n, p in model.named_parameters():          # frozen parts in dtype, trainable ones in fp32
        if not p.requires_grad:
            p.data = p.data.to(dtype)
    with torch.no_grad():
        for m in lora_modules(model.llm).values():
            m.lora_B.weight.normal_(0, 0.01)
    return model.train()


def hf_twin(model: SpeechLLM):
    """transformers' Whisper encoder and Qwen2 + peft LoRA holding the very same tensors as `model`."""
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFWhisperEncoder

    c, w = model.config.llm, model.config.whisper
    with torch.device("meta"):
        hf_w = HFWhisperEncoder(transformers.WhisperConfig(
            d_model=w.d_model, encoder_layers=w.encoder_layers, encoder_attention_heads=w.encoder_attention_heads,
            encoder_ffn_dim=w.encoder_ffn_dim, num_mel_bins=w.num_mel_bins, max_source_positions=w.max_source_positions,
            attn_implementation="sdpa"))
    hf_w.load_state_dict(model.speech_encoder.state_dict(), assign=True)
    hf_w.eval().requires_grad_(False)
    dtype = model.llm.model.embed_tokens.weight.dtype
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(model.llm.model.embed_tokens.weight.device):
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads, rope_theta=c.rope_theta, rms_norm_eps=c.rms_norm_eps,
            tie_word_embeddings=False, attn_implementation="sdpa"))
    torch.set_default_dtype(default)
    base = {k: v for k, v in model.llm.state_dict().items() if ".lora_" not in k}
    hf.load_state_dict(base, assign=True)
    peft = get_peft_model(hf, LoraConfig(r=model.config.lora_r, lora_alpha=model.config.lora_alpha,
                                         lora_dropout=model.config.lora_dropout, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, m in lora_modules(model.llm).items():
            target = peft.base_model.model.get_submodule(name)
            target.lora_A["default"].weight.copy_(m.lora_A.weight)
            target.lora_B["default"].weight.copy_(m.lora_B.weight)
    return hf_w, peft.train()


def inputs(model, B, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    mel = torch.randn(B, model.config.whisper.num_mel_bins, 3000, generator=g).to(device)
    fbank = torch.randn(B, 2998, 128, generator=g).to(device)
    instr = ["Listen to the speech and translate it into Chinese."] * B
    targets = ["所有这些活动在密尔沃基都不是独一无二的。"] * B
    transcripts = ["All of this activity in Milwaukee was in no way unique."] * B
    return mel, fbank, instr, targets, transcripts


def ours_step(model, opt, mel, fbank, instr, targets, transcripts, timings):
    speech = model.encode_speech(mel, fbank, None)
    out = model.speech_pass(speech, instr, targets, layers=LAYERS)
    sync(mel.device)
    t = time.perf_counter()
    txt = model.text_pass(transcripts, instr, layers=LAYERS)
    sync(mel.device)
    timings.append(time.perf_counter() - t)
    ot = sum(sinkhorn.ot_loss(out.hidden_states[l], txt.hidden_states[l], out.mask, txt.mask).mean() for l in LAYERS)
    loss = ALPHA * out.loss + (1 - ALPHA) / len(LAYERS) * ot          # Eq. (6)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out.loss.item()


def hf_step(model, hf_w, peft, opt, mel, fbank, instr, targets, transcripts):
    with torch.no_grad():
        w = hf_w(mel.to(next(hf_w.parameters()).dtype)).last_hidden_state
        b, _ = model.beats(fbank.to(w.dtype), None)
    speech = model.bridge(w, b)
    B, n, _ = speech.shape
    batch = model.prompter.build(instr, [n] * B, targets)
    emb = peft.get_input_embeddings()
    dev = emb.weight.device
    x = emb(batch.input_ids.to(dev)).masked_scatter(batch.slot_mask.to(dev)[..., None], speech.to(emb.weight.dtype))
    out = peft(inputs_embeds=x, attention_mask=batch.attention_mask.to(dev).long(), labels=batch.labels.to(dev),
               output_hidden_states=True)
    start = len(model.prompter.before_ids)
    speech_h = {l: out.hidden_states[l][:, start:start + n] for l in LAYERS}
    ids = [model.tokenizer.encode(t) for t in transcripts]
    tb = model.prompter.build(instr, ids)
    with torch.no_grad():
        t_out = peft(input_ids=tb.input_ids.to(dev), attention_mask=tb.attention_mask.to(dev).long(),
                     output_hidden_states=True)
    m = max(len(i) for i in ids)
    text_h = {l: t_out.hidden_states[l][:, start:start + m] for l in LAYERS}
    tmask = tb.slot_mask[:, start:start + m].to(dev)
    smask = torch.ones(B, n, dtype=torch.bool, device=dev)
    ot = sum(sinkhorn.ot_loss(speech_h[l], text_h[l], smask, tmask).mean() for l in LAYERS)
    loss = ALPHA * out.loss + (1 - ALPHA) / len(LAYERS) * ot
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out.loss.item()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="frozen parts (default: bf16 on CUDA)")
    ap.add_argument("--real-size", action="store_true", help="qwen2-7b, whisper-large-v2, BEATs iter3+ sizes")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    model = build(args.real_size, device, dtype)
    hf_w, peft = hf_twin(model)
    data = inputs(model, args.batch, device)
    # LoRA dropout off in both, so the two steps compute the same numbers
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    for m in peft.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    # lr 0: the optimizers do all their work but leave the weights as they are, so every step of both
    # builds computes the same loss, which is checked below
    opt_ours = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)
    peft_lora = [p for n, p in peft.named_parameters() if p.requires_grad]
    opt_hf = torch.optim.AdamW([p for p in model.bridge.parameters()] + peft_lora, lr=0.0)
    print(f"device {device}, frozen dtype {dtype}, batch {args.batch} x 30 s, threads {torch.get_num_threads()}; "
          f"{model.describe_trainable()}")

    text_times = []
    best = {"ours": float("inf"), "hf": float("inf")}
    losses = {}
    for r in range(args.repeats + 1):                      # round 0 is the warm-up
        for name in (["ours", "hf"] if r % 2 == 0 else ["hf", "ours"]):
            sync(device)
            t = time.perf_counter()
            if name == "ours":
                losses[name] = ours_step(model, opt_ours, *data, text_times)
            else:
                losses[name] = hf_step(model, hf_w, peft, opt_hf, *data)
            sync(device)
            if r > 0:
                best[name] = min(best[name], time.perf_counter() - t)
    text = min(text_times[1:])
    print(f"CE: ours {losses['ours']:.5f}, HF {losses['hf']:.5f}")
    assert abs(losses["ours"] - losses["hf"]) <= 1e-3 * abs(losses["hf"]) + 1e-3, "the two builds differ"
    print(f"step  ours {best['ours'] * 1e3:8.1f} ms   HF + peft {best['hf'] * 1e3:8.1f} ms   "
          f"({args.batch / best['ours']:.2f} vs {args.batch / best['hf']:.2f} samples/s)")
    print(f"our text pass {text * 1e3:.1f} ms = {100 * text / best['ours']:.1f}% of our step")
    print(f"step_ratio={best['ours'] / best['hf']:.3f} text_pass_share={text / best['ours']:.3f}")


if __name__ == "__main__":
    main()
