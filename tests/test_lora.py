"""LoRA equals PEFT's on a tiny Hugging Face Llama, and its adapter exports to PEFT's format (SALMONN's keys are
read through SpeechLLM.load_trainable: tests/test_speech_llm.py)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from lora import LoRALinear, count_trainable, export_peft_adapter, inject_lora, lora_state_dict, merge_lora, unmerge_lora
from qformer import QFormerConfig, WindowQFormer

R, ALPHA = 4, 16  # scale 4, as SALMONN's r=8, alpha=32


def tiny_llama(seed=0):
    """Tiny Llama with grouped KV heads (v_proj out 16 != hidden 32, as Qwen2-7B's 512 != 3584) and
    attention biases (as Qwen2's q/k/v)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attention_bias=True)
    return LlamaForCausalLM(cfg).eval()


def injected(base, dropout=0.0, seed=1):
    """A copy of `base` with our LoRA, with B non-zero so that gradients reach A."""
    m = copy.deepcopy(base)
    inject_lora(m, r=R, alpha=ALPHA, dropout=dropout)
    torch.manual_seed(seed)
    with torch.no_grad():
        for k, p in lora_state_dict(m).items():
            p.normal_(0.0, 0.2)
    return m


def peft_copy(base, ours):
    """PEFT's LoRA on another copy of `base`, with our A and B copied in."""
    p = get_peft_model(copy.deepcopy(base), LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0,
                                                       target_modules=["q_proj", "v_proj"]))
    theirs = dict(p.named_parameters())
    with torch.no_grad():
        for k, v in lora_state_dict(ours).items():
            ab = ".lora_A." if ".lora_A." in k else ".lora_B."
            theirs["base_model.model." + k.replace(ab, ab + "default.")].copy_(v)
    return p.eval()


IDS = torch.tensor([[1, 5, 9, 33, 2, 60, 7], [3, 3, 40, 12, 8, 1, 0]])


def test_matches_peft_outputs_and_gradients():
    base = tiny_llama()
    ours = injected(base)
    theirs = peft_copy(base, ours)
    lo, lt = ours(IDS).logits, theirs(IDS).logits
    torch.testing.assert_close(lo, lt)
    assert not torch.allclose(lo, base(IDS).logits)  # the adapters do something
    F.cross_entropy(lo.flatten(0, 1), IDS.flatten()).backward()
    F.cross_entropy(lt.flatten(0, 1), IDS.flatten()).backward()
    tgrads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert len(tgrads) == len(lora_state_dict(ours)) == 8
    for k, p in lora_state_dict(ours).items():
        ab = ".lora_A." if ".lora_A." in k else ".lora_B."
        g = tgrads["base_model.model." + k.replace(ab, ab + "default.")]
        assert g.abs().sum() > 0
        torch.testing.assert_close(p.grad, g)


def test_injection_reuses_and_freezes_base_weights():
    base = tiny_llama()
    q = base.model.layers[1].self_attn.q_proj
    w, b = q.weight, q.bias
    keys_before = set(base.state_dict())
    names = inject_lora(base, r=R, alpha=ALPHA)
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    q = base.model.layers[1].self_attn.q_proj
    assert isinstance(q, LoRALinear) and q.weight is w and q.bias is b  # the same Parameters, not copies
    assert not q.training and not q.lora_dropout.training  # follows the eval-mode model it was injected into
    keys = set(base.state_dict())
    assert keys_before <= keys  # the base keys are unchanged
    assert keys - keys_before == {f"{n}.lora_{ab}.weight" for n in names for ab in "AB"}
    assert {n for n, p in base.named_parameters() if p.requires_grad} == keys - keys_before
    assert base.model.layers[0].self_attn.v_proj.lora_B.weight.shape == (16, R)  # GQA: v_proj out 16
    assert torch.all(q.lora_B.weight == 0)
    with pytest.raises(ValueError, match="already has LoRA"):
        inject_lora(base, r=R, alpha=ALPHA)
    with pytest.raises(ValueError, match="no nn.Linear named \\['wq'\\]"):
        inject_lora(tiny_llama(), targets=("wq",))


def test_fresh_injection_is_the_base_model():
    base = tiny_llama()
    m = copy.deepcopy(base)
    inject_lora(m, r=R, alpha=ALPHA)  # B = 0
    torch.testing.assert_close(m(IDS).logits, base(IDS).logits, rtol=0, atol=0)


def test_merge_unmerge():
    base = tiny_llama()
    ours = injected(base)
    w0 = ours.model.layers[0].self_attn.q_proj.weight.clone()
    with torch.no_grad():
        unmerged = ours(IDS).logits
        merge_lora(ours)
        assert not torch.allclose(ours.model.layers[0].self_attn.q_proj.weight, w0)
        torch.testing.assert_close(ours(IDS).logits, unmerged)
        unmerge_lora(ours)
    torch.testing.assert_close(ours.model.layers[0].self_attn.q_proj.weight, w0, rtol=0, atol=1e-6)
    with pytest.raises(RuntimeError, match="not merged"):
        unmerge_lora(ours)


def test_bf16_base_with_fp32_lora():
    torch.manual_seed(0)
    lin = nn.Linear(32, 16).to(torch.bfloat16)
    w0 = lin.weight.detach().clone()
    layer = LoRALinear.from_linear(lin, r=R, alpha=ALPHA, dropout=0.0)
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A.weight.dtype == torch.float32
    with torch.no_grad():
        layer.lora_B.weight.normal_(0.0, 0.2)
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    # the frozen path in bf16, the adapter in fp32 on the upcast input, the sum cast back: exactly, op for op
    ref = (F.linear(x, w0, lin.bias) + ALPHA / R * (x.float() @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
           ).to(torch.bfloat16)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    # and against fp32 arithmetic: two bf16 roundings of O(1) outputs (base, sum) at 2^-8 relative each
    full = F.linear(x.float(), w0.float(), lin.bias.float()) + ALPHA / R * (x.float() @ layer.lora_A.weight.T
                                                                           @ layer.lora_B.weight.T)
    torch.testing.assert_close(y.float(), full, rtol=2 * 2 ** -8, atol=2 * 2 ** -8 * full.abs().max().item())
    layer.merge()
    layer.unmerge()
    # bf16: W is back up to bf16 rounding of W + dW (documented), not bit-exact
    torch.testing.assert_close(layer.weight.float(), w0.float(), rtol=0, atol=2 ** -7)


def test_dropout_on_lora_branch_only():
    torch.manual_seed(0)
    layer = LoRALinear(16, 8, r=R, alpha=ALPHA, dropout=0.5).train()
    x = torch.randn(4, 16)
    base = F.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(layer(x), base, rtol=0, atol=0)  # B = 0: the base path is never dropped
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    torch.manual_seed(123)
    y = layer(x)
    torch.manual_seed(123)
    expected = base + ALPHA / R * layer.lora_B(layer.lora_A(F.dropout(x, 0.5, training=True)))
    torch.testing.assert_close(y, expected)
    assert not torch.allclose(y, base + ALPHA / R * layer.lora_B(layer.lora_A(x)))  # the dropout did act
    layer.eval()
    torch.testing.assert_close(layer(x), base + ALPHA / R * layer.lora_B(layer.lora_A(x)))


def test_peft_adapter_export(tmp_path):
    base = tiny_llama()
    ours = injected(base)
    out = str(tmp_path / "peft_adapter")
    export_peft_adapter(ours, out, base_model_name_or_path="tiny-llama")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
    assert loaded.peft_config["default"].r == R and loaded.peft_config["default"].lora_alpha == ALPHA
    assert set(loaded.peft_config["default"].target_modules) == {"q_proj", "v_proj"}
    torch.testing.assert_close(loaded(IDS).logits, ours(IDS).logits)


def test_trainable_counts_at_real_sizes():
    """Q-Former + projection + LoRA (r=8 on q/v of every layer), built on the meta device at real sizes."""
    with torch.device("meta"):
        vicuna = LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                                              num_hidden_layers=40, num_attention_heads=40))
        qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                            num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4))
        bridges = {h: WindowQFormer(QFormerConfig(llm_hidden=h)) for h in (5120, 3584)}
    inject_lora(vicuna)
    inject_lora(qwen)
    assert qwen.model.layers[0].self_attn.v_proj.lora_B.weight.shape == (512, 8)  # 4 KV heads x 128
    assert qwen.model.layers[0].self_attn.v_proj.lora_A.weight.device.type == "meta"  # follows the base
    # closed forms: per Q-Former layer self-attention 4*(768*768+768) + 2*768, cross-attention
    # 2*(768*768+768) + 2*(2048*768+768) + 2*768, FFN 768*3072+3072 + 3072*768+768 + 2*768;
    # plus the query (768), the embeddings LayerNorm (1536), ln_speech (2560), ln_audio (1536)
    qformer = 2 * (2_363_904 + 4_329_984 + 4_723_968) + 768 + 1536
    for h, lora_total in ((5120, 40 * 8 * (5120 + 5120 + 5120 + 5120)), (3584, 28 * 8 * (3584 + 3584 + 3584 + 512))):
        c = count_trainable(bridges[h])
        assert c["speech_query_tokens"] + c["speech_Qformer"] == qformer == 22_838_016
        assert c["ln_speech"] + c["ln_audio"] == 4096
        assert c["speech_llama_proj"] == 768 * h + h
    assert count_trainable(vicuna) == {"lora": 6_553_600, "total": 6_553_600}
    assert count_trainable(qwen) == {"lora": 2_523_136, "total": 2_523_136}
    totals = {h: count_trainable(bridges[h])["total"] for h in bridges}
    assert totals[5120] + 6_553_600 == 33_332_992  # Vicuna-13B: 33.3 M (the paper says 64 M)
    assert totals[3584] + 2_523_136 == 28_121_344  # Qwen2-7B: 28.1 M (the paper says 28 M)


def test_adapter_trained_on_our_llm_loads_in_peft(tmp_path):
    """Our LLM with our LoRA -> PEFT adapter directory -> transformers' Qwen2 + peft: the same logits,
    merged or not (our module paths are HF's, so the adapter's keys land on the right projections)."""
    from model import LLM

    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                      attn_implementation="sdpa")).eval()
    hf.save_pretrained(tmp_path / "base")
    ours = LLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    inject_lora(ours, r=4, alpha=16, dropout=0.0)
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    export_peft_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    base = LLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        ref = peft_model(ids).logits
        assert (ref - base(ids).logits).abs().max() > 1e-2    # the adapter does change the logits
        torch.testing.assert_close(ours(ids).logits, ref, rtol=1e-5, atol=1e-5)
        merge_lora(ours)
        torch.testing.assert_close(ours(ids).logits, ref, rtol=1e-4, atol=1e-4)
