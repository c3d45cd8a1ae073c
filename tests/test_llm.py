"""The hand-written LLM equals HF transformers' Qwen2 / Llama: logits, hidden states, generation, loading."""
import copy
import json

import pytest
import torch
from safetensors.torch import save_file
from torch.testing import assert_close

from model import LLM, LLMConfig, CheckpointError, KVCache

transformers = pytest.importorskip("transformers")

# Tiny random configs covering both families: GQA and not, q/k/v biases, all-four biases, odd vocab sizes,
# a head_dim that does not divide the hidden size. initializer_range 0.2 makes the logits peaked, so that
# greedy and beam-search comparisons are not decided by float rounding between near-ties.
CONFIGS = {
    "qwen2-gqa": ("Qwen2", dict(vocab_size=263, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6)),
    "llama-mha": ("Llama", dict(vocab_size=301, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=4, rope_theta=10000.0)),
    "llama-mqa-bias": ("Llama", dict(vocab_size=199, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                     attention_bias=True, mlp_bias=True)),
}


def make_hf(name, seed=0):
    family, kw = CONFIGS[name]
    cfg_cls = getattr(transformers, f"{family}Config")
    model_cls = getattr(transformers, f"{family}ForCausalLM")
    torch.manual_seed(seed)
    cfg = cfg_cls(**kw, initializer_range=0.2, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  attn_implementation="sdpa")
    hf = model_cls(cfg).eval()
    with torch.no_grad():  # non-trivial biases and norm weights, so a mis-wired one cannot hide
        for n, p in hf.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.normal_(1.0 if "norm" in n else 0.0, 0.3)
    return hf


def save_bin(hf, path, shards=1, inv_freq=True):
    """Write the legacy pickled layout (pytorch_model.bin or sharded + index), as HF 4.x and Vicuna do."""
    path.mkdir(parents=True, exist_ok=True)
    hf.config.save_pretrained(path)
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    if inv_freq:  # old Llama checkpoints carry RoPE's buffer; the loader must drop it
        sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    if shards == 1:
        torch.save(sd, path / "pytorch_model.bin")
        return path
    keys = list(sd)
    weight_map = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: sd[k] for k in keys[i::shards]}
        torch.save(part, path / name)
        weight_map.update({k: name for k in part})
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    hf = make_hf(request.param)
    d = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(d / "st")
    ours = LLM.from_pretrained(d / "st", dtype=torch.float32)
    return request.param, hf, ours, d


def test_loads_all_formats_identically(pair):
    name, hf, ours, d = pair
    hf.save_pretrained(d / "sharded", max_shard_size="20KB")
    assert len(list((d / "sharded").glob("model-*.safetensors"))) > 1
    ref = ours.state_dict()
    for sub, writer in [("sharded", None), ("bin", lambda p: save_bin(hf, p)),
                        ("bin-sharded", lambda p: save_bin(hf, p, shards=3))]:
        if writer:
            writer(d / sub)
        other = LLM.from_pretrained(d / sub, dtype=torch.float32).state_dict()
        assert other.keys() == ref.keys()
        for k in ref:
            assert torch.equal(other[k], ref[k]), (sub, k)


def test_loads_in_bf16_without_fp32_copy(pair):
    name, hf, ours, d = pair
    m = LLM.from_pretrained(d / "st", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in m.parameters())


def test_logits_and_hidden_states_equal_hf(pair):
    name, hf, ours, _ = pair
    V = hf.config.vocab_size
    torch.manual_seed(1)
    ids = torch.randint(0, V, (2, 17))
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True)
        out = ours(ids, output_layers=range(hf.config.num_hidden_layers + 1))
    # float32, the same operations (ours and HF's may order some sums differently): a few ulps of O(1) values
    assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    L = hf.config.num_hidden_layers
    for l in range(L):  # HF's hidden_states[l] = input of block l = our layer l
        assert_close(out.hidden_states[l], ref.hidden_states[l], rtol=1e-5, atol=1e-5)
    # HF's last entry is after the final norm; ours is the residual stream before it
    assert_close(ours.model.norm(out.hidden_states[L]), ref.hidden_states[L], rtol=1e-5, atol=1e-5)


def test_inputs_embeds_equal_input_ids(pair):
    _, hf, ours, _ = pair
    ids = torch.randint(0, hf.config.vocab_size, (2, 9))
    with torch.no_grad():
        a = ours(ids).logits
        b = ours(inputs_embeds=ours.model.embed_tokens(ids)).logits
    assert torch.equal(a, b)


def test_stop_at_highest_requested_layer(pair):
    _, hf, ours, _ = pair
    ids = torch.randint(0, hf.config.vocab_size, (2, 11))
    called = []
    hooks = [b.register_forward_hook(lambda m, i, o, j=j: called.append(j)) for j, b in enumerate(ours.model.layers)]
    head = ours.lm_head.register_forward_hook(lambda m, i, o: called.append("lm_head"))
    try:
        with torch.no_grad():
            full = ours(ids, output_layers=[0, 1])
            called.clear()
            part = ours(ids, output_layers=[0, 1], logits=None)
    finally:
        for h in hooks + [head]:
            h.remove()
    assert called == [0]          # only block 0 ran: layer 1 is its output; no lm_head
    assert part.logits is None
    for l in (0, 1):
        assert torch.equal(part.hidden_states[l], full.hidden_states[l])


def test_padded_batch_equals_each_row_alone(pair):
    _, hf, ours, _ = pair
    ours64 = copy.deepcopy(ours).double()   # two paths through our own code: float64, agreement to ~1e-10
    V = hf.config.vocab_size
    torch.manual_seed(2)
    rows = [torch.randint(0, V, (n,)) for n in (12, 7, 3)]
    T = 12
    for side in ("left", "right"):
        ids = torch.zeros(3, T, dtype=torch.long)
        mask = torch.zeros(3, T, dtype=torch.long)
        for i, r in enumerate(rows):
            sl = slice(T - len(r), T) if side == "left" else slice(0, len(r))
            ids[i, sl], mask[i, sl] = r, 1
        with torch.no_grad():
            out = ours64(ids, attention_mask=mask, output_layers=[2])
            out32 = ours(ids, attention_mask=mask)
            ref = hf(ids, attention_mask=mask).logits
        for i, r in enumerate(rows):
            sl = slice(T - len(r), T) if side == "left" else slice(0, len(r))
            with torch.no_grad():
                alone = ours64(r[None], output_layers=[2])
            assert torch.isfinite(out.logits).all()
            assert_close(out.logits[i, sl], alone.logits[0], rtol=1e-10, atol=1e-10)
            assert_close(out.hidden_states[2][i, sl], alone.hidden_states[2][0], rtol=1e-10, atol=1e-10)
            # against HF in float32: the same operations, a few ulps of O(1) logits
            assert_close(out32.logits[i, sl], ref[i, sl], rtol=1e-5, atol=1e-5)


def _hf_new_tokens(hf, ids, mask, eos, pad, **kw):
    with torch.no_grad():
        seq = hf.generate(ids, attention_mask=mask, do_sample=False, eos_token_id=eos, pad_token_id=pad, **kw)
    out = []
    for row in seq[:, ids.shape[1]:].tolist():
        out.append(row[:row.index(eos)] if eos in row else row)
    return out


def _left_pad(rows, pad=0):
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = torch.tensor(r), 1
    return ids, mask


def _pick_eos(hf, prompt, at=6):
    """(token, step): a token that greedy decoding first emits at step >= `at`, so EOS really stops rows."""
    with torch.no_grad():
        seq = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=24, eos_token_id=None,
                          pad_token_id=0)
    new = seq[0, len(prompt):].tolist()
    step = next(i for i in range(at, len(new)) if new[i] not in new[:i])
    return new[step], step


def test_greedy_generation_equals_hf(pair):
    _, hf, ours, _ = pair
    V = hf.config.vocab_size
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (5, 9, 2)]
    ids, mask = _left_pad(prompts)
    # no EOS: 24 new tokens each
    ref = _hf_new_tokens(hf, ids, mask, eos=None, pad=0, max_new_tokens=24)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=24)
    assert got == ref and all(len(r) == 24 for r in got)
    # with an EOS that fires: every row stops on its own
    eos, stop = _pick_eos(hf, prompts[0])
    ref = _hf_new_tokens(hf, ids, mask, eos=eos, pad=0, max_new_tokens=24)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=24, eos_token_id=eos)
    assert got == ref and len(got[0]) == stop
    # each row alone gives the batched result, also when starting from embeddings
    for i, p in enumerate(prompts):
        assert ours.generate(torch.tensor([p]), max_new_tokens=24, eos_token_id=eos) == [got[i]]
    embeds = ours.model.embed_tokens(ids)
    assert ours.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=24, eos_token_id=eos) == got


@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0])
def test_beam_search_equals_hf(pair, length_penalty):
    _, hf, ours, _ = pair
    V = hf.config.vocab_size
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (6, 3, 8)]
    ids, mask = _left_pad(prompts)
    frequent = max(range(V), key=[t for r in ours.generate(ids, attention_mask=mask, num_beams=4, max_new_tokens=20)
                                  for t in r].count)  # the most common token as EOS: many beams end early
    for eos in (None, _pick_eos(hf, prompts[1], at=3)[0], frequent):
        kw = dict(num_beams=4, max_new_tokens=20, length_penalty=length_penalty)
        ref = _hf_new_tokens(hf, ids, mask, eos=eos, pad=0, early_stopping=False, **kw)
        got = ours.generate(ids, attention_mask=mask, eos_token_id=eos, **kw)
        assert got == ref, (eos, got, ref)
        for i, p in enumerate(prompts):  # padded batch = each prompt alone
            assert ours.generate(torch.tensor([p]), eos_token_id=eos, **kw) == [got[i]]
        embeds = ours.model.embed_tokens(ids)
        assert ours.generate(inputs_embeds=embeds, attention_mask=mask, eos_token_id=eos, **kw) == got


def test_generation_rejects_right_padding(pair):
    _, hf, ours, _ = pair
    ids = torch.ones(2, 4, dtype=torch.long)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with pytest.raises(ValueError, match="LEFT-padded"):
        ours.generate(ids, attention_mask=mask, max_new_tokens=2)


def test_kv_cache_chunked_prefill_equals_full(pair):
    _, hf, ours, _ = pair
    ours64 = copy.deepcopy(ours).double()   # two paths through our own code: float64
    ids = torch.randint(0, hf.config.vocab_size, (2, 10))
    with torch.no_grad():
        full = ours64(ids).logits
        cache = KVCache(ours64.config, 2, 16, "cpu", torch.float64)
        a = ours64(ids[:, :6], cache=cache).logits
        b = ours64(ids[:, 6:], cache=cache).logits
    assert_close(torch.cat([a, b], 1), full, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="overflow"):
        ours64(ids, cache=cache)


# ---------------------------------------------------------------- presets: the real sizes, on meta

@pytest.mark.parametrize("preset,family,hf_kw,n_params", [
    ("qwen2-7b", "Qwen2", dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                                rope_theta=1e6, tie_word_embeddings=False), 7_615_616_512),
    ("vicuna-13b-v1.1", "Llama", dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                                      num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                                      tie_word_embeddings=False), 13_015_864_320),
])
def test_presets_match_hf_shapes(preset, family, hf_kw, n_params):
    with torch.device("meta"):
        ours = LLM(LLMConfig.from_name(preset))
        hf = getattr(transformers, f"{family}ForCausalLM")(getattr(transformers, f"{family}Config")(**hf_kw))
    a = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    assert a == b
    assert ours.num_parameters() == sum(p.numel() for p in hf.parameters()) == n_params


def test_config_from_dir_round_trip(tmp_path):
    hf = make_hf("qwen2-gqa")
    hf.config.save_pretrained(tmp_path)
    cfg = LLMConfig.from_dir(tmp_path)
    assert (cfg.family, cfg.qkv_bias, cfg.o_bias, cfg.num_key_value_heads, cfg.rope_theta) == ("qwen2", True, False, 2, 1e6)


# ---------------------------------------------------------------- bad input: clear errors

def test_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        LLM.from_pretrained(tmp_path)


def test_unknown_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'"):
        LLM.from_pretrained(tmp_path)


def test_index_names_missing_shard(tmp_path):
    hf = make_hf("llama-mha")
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        LLM.from_pretrained(tmp_path)


def test_truncated_safetensors(tmp_path):
    hf = make_hf("llama-mha")
    hf.save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        LLM.from_pretrained(tmp_path)


def test_shape_mismatch_names_key(tmp_path):
    hf = make_hf("llama-mha")
    hf.save_pretrained(tmp_path)
    sd = dict(hf.state_dict())
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(5, 5)
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight has shape \(5, 5\)"):
        LLM.from_pretrained(tmp_path)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    hf = make_hf("llama-mha")
    hf.save_pretrained(tmp_path)
    sd = dict(hf.state_dict())
    del sd["model.norm.weight"]
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing key\(s\).*model\.norm\.weight"):
        LLM.from_pretrained(tmp_path)
    sd["model.norm.weight"] = torch.ones(64)
    sd["model.extra.weight"] = torch.ones(3)
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected key\(s\).*model\.extra\.weight"):
        LLM.from_pretrained(tmp_path)


def test_bad_output_layers():
    m = LLM(LLMConfig(vocab_size=11, hidden_size=8, intermediate_size=8, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(ValueError, match="output_layers"):
        m(torch.zeros(1, 3, dtype=torch.long), output_layers=[3])
