"""One joint-stage training step: train.py's own step against a SALMONN-style build from transformers + peft.

    python benchmarks/bench_speech_llm.py                       # small speech LLM on the CPU, batch 2 x 30 s
    python benchmarks/bench_speech_llm.py --device cuda --real-size --batch 8 --peak-tflops 989   # qwen2-7b preset

Ours is `train.train_step` exactly as `train.py` runs it (micro-batch seed, autocast on CUDA, encoders -> Q-Former
-> speech pass (CE) -> text pass to layer 1 (no grad) -> OT at layers {0, 1} -> Eq. (6) -> backward -> clip ->
the finite check -> AdamW), and again with `align="none"` (CE only). The alternative shares every weight:
  HF:   transformers' WhisperEncoder and Qwen2ForCausalLM with peft LoRA (q_proj, v_proj, r=8), our BEATs and
        Q-Former (transformers has neither); the LM head and loss on every position (labels=...), the hidden
        states from output_hidden_states=True, the text pass a full forward under no_grad; clip and AdamW.
The learning rate is 0 in both, so every repeat computes the same loss (checked). It prints the step times, the
share of text pass + OT in ours (timed alone), the model FLOPs per sample (matmuls of the encoders, Q-Former, LLM forward and
backward) and the achieved FLOP rate (MFU with --peak-tflops), the peak memory on CUDA, and as its last line
`step_ratio=<ours/HF> align_share=<text pass + OT / ours>`.
"""
import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data  # noqa: E402
import sinkhorn  # noqa: E402
import train  # noqa: E402
from bench_audio import whisper_flops  # noqa: E402  (this folder: the script's own)
from lora import lora_modules  # noqa: E402
from model import (BEATsConfig, LLMConfig, QFormerConfig, SpeechLLM, SpeechLLMConfig,  # noqa: E402
                   Tokenizer, WhisperEncoderConfig)

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


def make_batch(model, B, device, seed=0):
    """A data.Batch with its features already computed (random: the step's cost does not depend on them)."""
    g = torch.Generator().manual_seed(seed)
    mel = torch.randn(B, model.config.whisper.num_mel_bins, 3000, generator=g)
    fbank = torch.randn(B, 2998, 128, generator=g)
    return data.Batch(ids=[f"u{i}" for i in range(B)], tasks=["st_en_zh"] * B,
                      instructions=["Listen to the speech and translate it into Chinese."] * B,
                      targets=["所有这些活动在密尔沃基都不是独一无二的。"] * B,
                      transcripts=["All of this activity in Milwaukee was in no way unique."] * B,
                      wavs=torch.zeros(B, 480000), padding_mask=torch.zeros(B, 480000, dtype=torch.bool),
                      mel=mel, fbank=fbank).to(device)


def step_args(align):
    """train.train_step's settings: lr 0 at every step (warm-up 0, peak = floor = 0)."""
    return SimpleNamespace(steps=1, warmup=0, lr=0.0, warmup_lr=0.0, min_lr=0.0, seed=0, clip=1.0, align=align,
                           layers=LAYERS if align == "ot" else [], alpha=train.ALPHA)


def hf_step(model, hf_w, peft, opt, params, batch, ctx):
    with torch.no_grad():
        w = hf_w(batch.mel.to(next(hf_w.parameters()).dtype)).last_hidden_state
        b, _ = model.beats(batch.fbank.to(w.dtype), None)
    with ctx.autocast():
        speech = model.bridge(w, b)
        B, n, _ = speech.shape
        prompt = model.prompter.build(batch.instructions, [n] * B, batch.targets)
        emb = peft.get_input_embeddings()
        dev = emb.weight.device
        x = emb(prompt.input_ids.to(dev)).masked_scatter(prompt.slot_mask.to(dev)[..., None],
                                                          speech.to(emb.weight.dtype))
        out = peft(inputs_embeds=x, attention_mask=prompt.attention_mask.to(dev).long(),
                   labels=prompt.labels.to(dev), output_hidden_states=True)
        start = len(model.prompter.before_ids)
        speech_h = {l: out.hidden_states[l][:, start:start + n] for l in LAYERS}
        ids = [model.tokenizer.encode(t) for t in batch.transcripts]
        tb = model.prompter.build(batch.instructions, ids)
        with torch.no_grad():
            t_out = peft(input_ids=tb.input_ids.to(dev), attention_mask=tb.attention_mask.to(dev).long(),
                         output_hidden_states=True)
        m = max(len(i) for i in ids)
        text_h = {l: t_out.hidden_states[l][:, start:start + m] for l in LAYERS}
        tmask = tb.slot_mask[:, start:start + m].to(dev)
        smask = torch.ones(B, n, dtype=torch.bool, device=dev)
        ot = sum(sinkhorn.ot_loss(speech_h[l], text_h[l], smask, tmask).mean() for l in LAYERS)
        loss = train.ALPHA * out.loss + (1 - train.ALPHA) / len(LAYERS) * ot
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out.loss.item()


@torch.no_grad()
def align_time(model, batch, ctx, repeats):
    """Seconds of what alignment adds to a step, timed alone: the text pass and the OT losses (the Sinkhorn
    iterations) on the speech pass's hidden states; min over repeats."""
    with ctx.autocast():
        speech = model.encode_speech(batch.mel, batch.fbank, batch.padding_mask)
        out = model.speech_pass(speech, batch.instructions, layers=LAYERS)
        best = float("inf")
        for _ in range(repeats + 1):
            sync(ctx.device)
            t = time.perf_counter()
            text = model.text_pass(batch.transcripts, batch.instructions, LAYERS)
            train.ot_losses(out.hidden_states, text.hidden_states, out.mask, text.mask)
            sync(ctx.device)
            best = min(best, time.perf_counter() - t)
    return best


def linear_flops(d_in, d_out, tokens):
    return 2 * d_in * d_out * tokens


def step_flops(model, batch) -> float:
    """Matmul FLOPs of one step per sample: encoders and the text pass forward, Q-Former and LLM speech pass
    forward + backward (the LLM's backward computes input gradients only: about one forward; the Q-Former's
    also weight gradients: two). Attention scores and values count 4·T²·d per layer; norms etc. are ignored."""
    c, w, q = model.config.llm, model.config.whisper, model.config.qformer
    T_w = w.max_source_positions
    whisper = whisper_flops(w)
    beats = 0
    if model.beats is not None:
        bc = model.config.beats
        T_b = (batch.fbank.shape[1] // 16) * (128 // 16)
        d = bc.encoder_embed_dim
        beats = bc.encoder_layers * (linear_flops(d, 4 * d + 2 * bc.encoder_ffn_embed_dim, T_b) + 4 * T_b ** 2 * d)
    n_win = model.bridge.num_speech_tokens(T_w)
    qformer = 3 * n_win * q.n_layer * (linear_flops(q.encoder_width, 2 * q.hidden, q.window)
                                       + linear_flops(q.hidden, 6 * q.hidden + 2 * q.ffn, q.num_query))
    prompt = model.prompter.build(batch.instructions, [n_win] * len(batch), batch.targets)
    T = prompt.attention_mask.sum(1).float().mean().item()
    n_tgt = (prompt.labels != -100).sum(1).float().mean().item()
    h_q, h_kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    per_token = linear_flops(c.hidden_size, 2 * h_q + 2 * h_kv + 3 * c.intermediate_size, 1)
    llm = (2 * c.num_hidden_layers * (per_token * T + 4 * T ** 2 * h_q)
           + 2 * linear_flops(c.hidden_size, c.vocab_size, n_tgt))
    T_txt = len(model.prompter.before_ids) + len(model.tokenizer.encode(batch.transcripts[0]))
    text = max(LAYERS) * (per_token * T_txt + 4 * T_txt ** 2 * h_q)
    return whisper + beats + qformer + llm + text


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="frozen parts (default: bf16 on CUDA)")
    ap.add_argument("--real-size", action="store_true", help="qwen2-7b, whisper-large-v2, BEATs iter3+ sizes")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="compile our repeated blocks as train.py does (default: on for CUDA)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, for the MFU")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    model = build(args.real_size, device, dtype)
    hf_w, peft = hf_twin(model)
    batch = make_batch(model, args.batch, device)
    ctx = train.Context(device, dtype)
    # LoRA and Q-Former dropout off in both, so the two steps compute the same numbers
    for m in list(model.modules()) + list(peft.modules()):
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    ours_params = [p for p in model.parameters() if p.requires_grad]
    opt_ours = train.make_optimizer([(n, p) for n, p in model.named_parameters() if p.requires_grad], 0.05)
    hf_params = list(model.bridge.parameters()) + [p for p in peft.parameters() if p.requires_grad]
    opt_hf = torch.optim.AdamW(hf_params, lr=0.0)
    if args.compile if args.compile is not None else device.type == "cuda":
        train.compile_blocks(model)
    print(f"device {device}, frozen dtype {dtype}, batch {args.batch} x 30 s, threads {torch.get_num_threads()}; "
          f"{model.describe_trainable()}")

    steps = {
        "ours": lambda: train.train_step(model, opt_ours, ours_params, [(0, batch)], 0, step_args("ot"), ctx)["ce"],
        "ours CE only": lambda: train.train_step(model, opt_ours, ours_params, [(0, batch)], 0, step_args("none"),
                                                 ctx)["ce"],
        "hf": lambda: hf_step(model, hf_w, peft, opt_hf, hf_params, batch, ctx),
    }
    best = {k: float("inf") for k in steps}
    losses = {}
    for r in range(args.repeats + 1):                      # round 0 is the warm-up (and compilation)
        for name in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            t = time.perf_counter()
            losses[name] = steps[name]()
            sync(device)
            if r > 0:
                best[name] = min(best[name], time.perf_counter() - t)
    print(f"CE: ours {losses['ours']:.5f}, HF {losses['hf']:.5f}")
    B = args.batch
    print(f"step  ours {best['ours'] * 1e3:8.1f} ms   HF + peft {best['hf'] * 1e3:8.1f} ms   "
          f"({B / best['ours']:.2f} vs {B / best['hf']:.2f} samples/s)")
    share = align_time(model, batch, ctx, args.repeats) / best["ours"]
    print(f"text pass + OT timed alone: {share * best['ours'] * 1e3:.1f} ms = {100 * share:.1f}% of our step "
          f"(our step with CE only: {best['ours CE only'] * 1e3:.1f} ms)")
    flops = step_flops(model, batch)
    rate = B * flops / best["ours"] / 1e12
    print(f"model FLOPs {flops / 1e12:.3f} TFLOP per sample; ours achieves {rate:.3g} TFLOP/s"
          + (f" = MFU {100 * rate / args.peak_tflops:.1f}% of {args.peak_tflops:g}" if args.peak_tflops else ""))
    if device.type == "cuda":
        print(f"peak memory (last step measured): {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    print(f"step_ratio={best['ours'] / best['hf']:.3f} align_share={share:.3f}")
    # the same work, checked after the figures are out: fp32 sums in another order agree to ~1e-6; in bf16 the
    # frozen weights' activations round at 8 bits (~4e-3 each) and the two builds round at different places
    rel = 1e-3 if dtype == torch.float32 else 2e-2
    assert abs(losses["ours"] - losses["hf"]) <= rel * abs(losses["hf"]) + 1e-3, "the two builds differ"


if __name__ == "__main__":
    main()
