"""train.py: the losses against references computed by hand, the schedule, where the OT gradient goes, the
command line's checks, and runs end to end on tiny checkpoints in the public layouts: overfitting, early
stopping, a NaN stop, resume after kill -9 (bitwise) and two gloo processes equal to one."""
import json
import math
import multiprocessing
import os
import shutil
import signal
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import data
import sinkhorn
import train
from model import SpeechLLM

PAIRS = [("hello world", "你好，世界！"), ("this is a test", "今天天气很好。"), ("it's fine", "我们去公园散步吧。"),
         ("new lines", "你好"), ("numbers and spaces", "世界"), ("the tokenizer", "公园")]


# ---------------------------------------------------------------- the losses, by hand

def tiny_batch(model, B=3, seed=0):
    from test_speech_llm import audio_features
    mel, fbank, mask = audio_features(B, seconds=[1.0 + 0.5 * i for i in range(B)], seed=seed)
    pairs = PAIRS[:B]
    instr = ["Listen to the speech and translate it into Chinese."] * B
    return data.Batch(ids=[f"u{i}" for i in range(B)], tasks=["st_en_zh"] * B, instructions=instr,
                      targets=[t for _, t in pairs], transcripts=[s for s, _ in pairs],
                      wavs=torch.zeros(mask.shape), padding_mask=mask, mel=mel, fbank=fbank)


@pytest.fixture(scope="module")
def tiny(qwen_dir):
    from test_speech_llm import tiny_speech_llm
    return tiny_speech_llm(qwen_dir, "qwen2").train()


def speech_and_text_states(model, batch, layers):
    """Hidden states at the speech and transcript positions, sliced by hand from full LLM forwards."""
    speech = model.encode_speech(batch.mel, batch.fbank, batch.padding_mask)
    B, n, _ = speech.shape
    p = model.prompter.build(batch.instructions, [n] * B, batch.targets)
    x = model.llm.model.embed_tokens(p.input_ids).masked_scatter(p.slot_mask[..., None], speech)
    full = model.llm(inputs_embeds=x, attention_mask=p.attention_mask, output_layers=layers)
    start = len(model.prompter.before_ids)
    ids = [model.tokenizer.encode(t) for t in batch.transcripts]
    m = max(map(len, ids))
    with torch.no_grad():
        model.llm.eval()
        tp = model.prompter.build(batch.instructions, ids)
        text = model.llm(tp.input_ids, attention_mask=tp.attention_mask, output_layers=layers)
        model.llm.train()
    tmask = torch.tensor([[j < len(r) for j in range(m)] for r in ids])
    return full, p, {l: full.hidden_states[l][:, start:start + n] for l in layers}, \
        {l: text.hidden_states[l][:, start:start + m] for l in layers}, tmask


def test_ce_and_ot_equal_eq6_by_hand(tiny):
    for m in tiny.modules():             # no dropout: the hand computation draws no masks
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    batch = tiny_batch(tiny)
    full, p, hs, ht, tmask = speech_and_text_states(tiny, batch, [0, 1, 3])
    logits = full.logits[:, :-1].float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), p.labels[:, 1:].reshape(-1), ignore_index=-100)
    loss, terms = train.compute_losses(tiny, batch, "none", [], 0.99)
    assert set(terms) == {"loss", "ce"}
    torch.testing.assert_close(loss, ce, rtol=1e-5, atol=0)   # float32: the same sums in another order
    smask = torch.ones(hs[0].shape[:2], dtype=torch.bool)
    w = {l: sinkhorn.ot_loss(hs[l], ht[l], smask, tmask).mean() for l in (0, 1)}
    alpha = 0.9
    loss, terms = train.compute_losses(tiny, batch, "ot", [0, 1], alpha)
    # float32, and the solver refreshes its plan (an exp) when any pair of its batch has moved far enough: the
    # layers solved together take other float32 paths to the same plan than one layer alone (~1e-5 apart)
    torch.testing.assert_close(terms["w0"], w[0], rtol=1e-4, atol=0)
    torch.testing.assert_close(terms["w1"], w[1], rtol=1e-4, atol=0)
    torch.testing.assert_close(loss, alpha * ce + (1 - alpha) / 2 * (w[0] + w[1]), rtol=1e-5, atol=0)   # Eq. (6)
    assert train.eq6_loss(ce, {}, alpha) is ce


def test_ctc_equals_f_ctc_loss_with_the_tokenizers_targets(tiny):
    batch = tiny_batch(tiny)
    torch.manual_seed(0)
    H, V = tiny.config.llm.hidden_size, tiny.config.llm.vocab_size
    head = torch.nn.Linear(H, V + 1)
    speech = torch.randn(3, 88, H)
    ids = [tiny.tokenizer.encode(t) for t in batch.transcripts]
    logp = F.log_softmax(speech @ head.weight.T + head.bias, dim=-1)          # (B, 88, V+1)
    ref = torch.stack([F.ctc_loss(logp[b], torch.tensor(ids[b]), (88,), (len(ids[b]),), blank=V, reduction="sum")
                       / len(ids[b]) for b in range(3)]).mean()
    torch.testing.assert_close(train.ctc_loss(head, speech, ids), ref, rtol=1e-5, atol=0)
    # a transcript longer than the 88 speech tokens has no CTC path: it contributes 0, not inf
    too_long = train.ctc_loss(head, speech[:1], [list(range(1, 100))])
    assert too_long.item() == 0.0
    # through compute_losses: L = α·CE + (1 - α)·CTC
    loss, terms = train.compute_losses(tiny, batch, "ctc", [0], 0.99, ctc_head=head)
    assert terms["ctc"] > 0 and torch.isclose(loss, 0.99 * terms["ce"] + 0.01 * terms["ctc"])


def test_contrastive_is_the_n_pair_loss(tiny):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 6, 8, generator=g), torch.randn(4, 5, 8, generator=g)
    smask = torch.rand(4, 6, generator=g) > 0.3
    tmask = torch.rand(4, 5, generator=g) > 0.3
    smask[:, 0] = tmask[:, 0] = True
    sm = [s[i][smask[i]].double().mean(0) for i in range(4)]
    tm = [t[i][tmask[i]].double().mean(0) for i in range(4)]
    sim = [[float(F.cosine_similarity(sm[i], tm[j], dim=0)) / train.CONTRASTIVE_TEMPERATURE for j in range(4)]
           for i in range(4)]
    # Sohn (2016): log(1 + sum_{j != i} exp(s_ij - s_ii)), averaged over anchors
    ref = sum(math.log(1 + sum(math.exp(sim[i][j] - sim[i][i]) for j in range(4) if j != i)) for i in range(4)) / 4
    assert train.contrastive_loss(s, smask, t, tmask).item() == pytest.approx(ref, rel=1e-5)
    loss, terms = train.compute_losses(tiny, tiny_batch(tiny), "contrastive", [0], 0.99)
    assert set(terms) == {"loss", "ce", "contrastive"}


def test_teacher_forced_validation_equals_the_speech_pass(tiny):
    tiny.eval()
    batch = tiny_batch(tiny)
    ce_sum, correct, n = train.teacher_forced(tiny, batch)
    speech = tiny.encode_speech(batch.mel, batch.fbank, batch.padding_mask)
    out = tiny.speech_pass(speech, batch.instructions, batch.targets)
    torch.testing.assert_close(ce_sum / n, out.loss, rtol=1e-5, atol=0)
    p = tiny.prompter.build(batch.instructions, [88] * 3, batch.targets)
    x = tiny.llm.model.embed_tokens(p.input_ids).masked_scatter(p.slot_mask[..., None], speech)
    logits = tiny.llm(inputs_embeds=x, attention_mask=p.attention_mask).logits[:, :-1]
    labels = p.labels[:, 1:]
    assert n == (labels != -100).sum() and correct == (logits.argmax(-1) == labels)[labels != -100].sum()
    tiny.train()


def test_encoder_cache_gives_each_clip_what_it_gives_alone(tiny):
    """--cache-encoders: the bridge reads each clip's encoder outputs as in a batch of one, and not, where the
    clips' lengths differ, what the padded batch gives (BEATs over the padding: SALMONN's behaviour)."""
    import copy
    model = copy.deepcopy(tiny).double().eval()    # float64: two paths through our code agree to rounding
    g = torch.Generator().manual_seed(0)
    wavs = [0.1 * torch.randn(int(s * 16000), generator=g) for s in (1.0, 2.3, 1.7)]

    def batch_of(ws, ids):
        padded, mask = data.pad_batch(ws)
        return data.Batch(ids=ids, tasks=["asr"] * len(ws), instructions=["x"] * len(ws), targets=["y"] * len(ws),
                          transcripts=["y"] * len(ws), wavs=padded, padding_mask=mask)

    def uncached(b):
        b = b.to("cpu")
        return model.encode_speech(b.mel, b.fbank, b.padding_mask)

    cache = train.EncoderCache()
    with torch.no_grad():
        cached = model.bridge(*cache.bridge_inputs(model, batch_of(wavs, ["a", "b", "c"]).to("cpu", features=False)))
        alone = torch.cat([uncached(batch_of([w], [i])) for w, i in zip(wavs, "abc")])
        assert len(cache) == 3 and cache.whisper["a"].dtype == torch.float64
        torch.testing.assert_close(cached, alone, rtol=0, atol=1e-10)
        batched = uncached(batch_of(wavs, ["a", "b", "c"]))
        torch.testing.assert_close(batched[1], cached[1], rtol=0, atol=1e-10)   # the longest clip: no padding
        assert (batched[0] - cached[0]).abs().max() > 1e-3                      # the others read the padding
        again = model.bridge(*cache.bridge_inputs(model, batch_of(wavs[::-1], ["c", "b", "a"])))
    assert len(cache) == 3 and torch.equal(again, cached.flip(0))


def test_ot_gradient_reaches_only_the_bridge_and_the_lora_below_the_layer(tiny):
    batch = tiny_batch(tiny)
    for layers, lora_blocks in (([0], set()), ([0, 1], {0})):
        tiny.zero_grad(set_to_none=True)
        speech = tiny.encode_speech(batch.mel, batch.fbank, batch.padding_mask)
        out = tiny.speech_pass(speech, batch.instructions, batch.targets, layers=layers)
        text = tiny.text_pass(batch.transcripts, batch.instructions, layers)
        assert all(not h.requires_grad for h in text.hidden_states.values())     # the text side is a target
        sum(train.ot_losses(out.hidden_states, text.hidden_states, out.mask, text.mask).values()).backward()
        got = {n for n, p in tiny.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert all(n.startswith("bridge.") or ".lora_" in n for n in got), got
        assert any(n.startswith("bridge.speech_Qformer") for n in got) and "bridge.speech_llama_proj.weight" in got
        # layer l's speech states depend on the LoRA of blocks below l only
        assert {int(n.split(".")[3]) for n in got if ".lora_" in n} == lora_blocks, got
    tiny.zero_grad(set_to_none=True)


def test_ot_losses_of_all_layers_in_one_solve_equal_one_solve_per_layer():
    """ot_losses solves every layer's pairs as one batch; per layer, loss and gradient equal ot_loss alone."""
    import sinkhorn
    g = torch.Generator().manual_seed(0)
    B, n, m, H = 4, 9, 6, 16
    speech = {l: (torch.randn(B, n, H, generator=g, dtype=torch.float64) * (l + 1)).requires_grad_() for l in (0, 2, 3)}
    text = {l: torch.randn(B, m, H, generator=g, dtype=torch.float64) for l in speech}
    s_mask = torch.arange(n) < torch.tensor([9, 7, 5, 9])[:, None]
    t_mask = torch.arange(m) < torch.tensor([6, 3, 6, 4])[:, None]
    got = train.ot_losses(speech, text, s_mask, t_mask)
    assert list(got) == [0, 2, 3]
    for l in speech:
        want = sinkhorn.ot_loss(speech[l], text[l], s_mask, t_mask).mean()
        # float64: the same plan by float paths that differ in when it is refreshed (see the test above)
        torch.testing.assert_close(got[l], want, rtol=1e-12, atol=0)
        g_got, = torch.autograd.grad(got[l], speech[l], retain_graph=True)
        g_want, = torch.autograd.grad(want, speech[l])
        torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=1e-15)
        assert g_got[~s_mask].abs().max() == 0


def test_activation_estimate_matches_saved_tensors():
    """The memory printed at start counts what autograd keeps per LLM block; measured here on a CPU LLM."""
    from lora import inject_lora
    from model import LLM, LLMConfig
    cfg = LLMConfig(vocab_size=100, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, qkv_bias=True, family="qwen2")
    llm = LLM(cfg)
    inject_lora(llm, ("q_proj", "v_proj"))
    llm.train()
    B, T = 2, 50
    x = torch.randn(B, T, 128, requires_grad=True)
    weights = {p.untyped_storage().data_ptr() for p in llm.parameters()} | {x.untyped_storage().data_ptr()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        llm(inputs_embeds=x, attention_mask=torch.ones(B, T, dtype=torch.bool), output_layers=[2], logits=None)
    expected = B * T * 2 * train.activation_bytes_per_token(cfg, 2, 4)
    assert 1.0 <= sum(saved.values()) / expected < 1.15


# ---------------------------------------------------------------- the schedule and the optimizer

def test_schedule_at_the_papers_key_steps():
    lr = lambda s: train.get_lr(s, 80_000, 9_000)     # stage 1: 80k steps, 9k warm-up (App. A.1)
    assert lr(0) == 1e-6
    assert lr(4_500) == pytest.approx((1e-6 + 3e-5) / 2)
    assert lr(8_999) < 3e-5
    # SALMONN's cosine is counted from step 0: at the end of the warm-up it is already 2% under the peak
    assert lr(9_000) == pytest.approx(1e-5 + 2e-5 * 0.5 * (1 + math.cos(math.pi * 9 / 80)))
    assert lr(40_000) == pytest.approx(2e-5)
    assert lr(80_000) == pytest.approx(1e-5) and lr(100_000) == pytest.approx(1e-5)
    after = [lr(s) for s in range(9_000, 80_001, 1000)]
    assert all(a > b for a, b in zip(after, after[1:]))
    assert train.STAGES["joint"]["warmup"] == 3_000 and train.STAGES["joint"]["eval_every"] == 3_000
    assert train.STAGES["joint"]["patience"] == 4 and train.STAGES["pretrain"]["steps"] == 80_000


def test_optimizer_decays_matrices_only(tiny):
    named = [(n, p) for n, p in tiny.named_parameters() if p.requires_grad]
    opt = train.make_optimizer(named, 0.05)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in named}
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert any(names[id(p)].endswith("LayerNorm.weight") for p in no_decay["params"])
    assert any(names[id(p)].endswith(".bias") for p in no_decay["params"])
    assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-8


# ---------------------------------------------------------------- tiny runs end to end

def write_manifest(path, pairs, clips, task="st"):
    lines = []
    for i, (src, tgt) in enumerate(pairs):
        wav = clips / f"{path.stem}_{i}.wav"
        t = np.arange(int((1.0 + 0.2 * i) * 16000)) / 16000
        sf.write(wav, (0.2 * np.sin(2 * np.pi * (200 + 50 * i) * t)).astype(np.float32), 16000)
        e = {"id": f"{path.stem}_{i}", "audio": str(wav.relative_to(path.parent)), "task": task}
        e.update({"lang": "en", "tgt_lang": "zh", "transcript": src, "translation": tgt} if task == "st"
                 else {"caption": tgt})
        lines.append(json.dumps(e, ensure_ascii=False))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_ckpts):
    """A stage-1 checkpoint of a tiny speech LLM (the public layouts) and manifests of real audio files.

    Its Whisper has a 3-s window (150 positions, 300 mel frames: 8 speech tokens) instead of 30 s: the runs
    below are the same code paths at a tenth of the encoder's cost."""
    import transformers
    from conftest import TINY_QFORMER
    from model import SpeechLLM
    d = tmp_path_factory.mktemp("train")
    transformers.WhisperModel(transformers.WhisperConfig(
        d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=80, max_source_positions=150, vocab_size=100,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=3)).save_pretrained(d / "whisper")
    ckpts = dict(tiny_ckpts, whisper=d / "whisper")
    model = SpeechLLM.from_pretrained(ckpts["llm"], ckpts["whisper"], ckpts["beats"],
                                      dtype=torch.float32, qformer=TINY_QFORMER, verbose=False)
    model.save_trainable(d / "stage1")
    (d / "clips").mkdir()
    return dict(dir=d, stage1=d / "stage1", **ckpts,
                train=write_manifest(d / "train.jsonl", PAIRS[:4], d / "clips"),
                valid=write_manifest(d / "valid.jsonl", PAIRS[:2], d / "clips"),
                aac=write_manifest(d / "aac.jsonl", PAIRS[:2], d / "clips", task="aac"))


def argv(s, out, *extra):
    base = {"--stage": "joint", "--backbone": s["llm"], "--whisper": s["whisper"], "--beats": s["beats"],
            "--init": s["stage1"], "--train": s["train"], "--out": out, "--workers": "0", "--log-every": "1",
            "--patience": "0"}
    given = {a for a in extra if str(a).startswith("--")}
    return [str(x) for k, v in base.items() if k not in given for x in (k, v)] + [str(a) for a in extra] + \
        ["--no-progress"]


# the reference run: 4 steps over the 4 training utterances, each step all of them in 2 micro-batches of 2
# (accumulation 2), with a learning rate high enough to see the loss fall in so few steps
REFERENCE = ("--layers", "0-1", "--global-batch", "4", "--micro-batch", "2", "--steps", "4", "--warmup", "1",
             "--lr", "1e-2", "--warmup-lr", "1e-3", "--min-lr", "1e-3", "--eval-every", "2", "--save-every", "1",
             "--keep", "2")


@pytest.fixture(scope="module")
def reference(setup):
    out = setup["dir"] / "reference"
    summary = train.main(argv(setup, out, *REFERENCE, "--valid", setup["valid"]))
    return out, summary


def trainable(ckpt):
    return load_file(str(Path(ckpt) / "trainable.safetensors"))


def test_joint_run_overfits_and_writes_everything(reference, setup):
    from model import SpeechLLM
    out, summary = reference
    metrics = train.read_metrics(out / "metrics.jsonl")
    steps = [r for r in metrics if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert set(steps[0]) == {"step", "loss", "ce", "w0", "w1", "lr", "grad_norm", "samples_per_s", "tokens_per_s",
                             "peak_mem_gib"}
    # the same 4 utterances every step: the CE falls (a random tiny LLM whose LoRA and bridge alone learn: slowly)
    ce = [r["ce"] for r in steps]
    assert ce[-1] < ce[0] - 0.05 and all(b < a for a, b in zip(ce, ce[1:])), ce
    assert [r["lr"] for r in steps] == [train.get_lr(s, 4, 1, 1e-2, 1e-3, 1e-3) for s in range(4)]
    for r in steps:     # Eq. (6) with α = 0.99 over |I| = 2 layers
        assert r["loss"] == pytest.approx(0.99 * r["ce"] + 0.005 * (r["w0"] + r["w1"]), rel=1e-5)
    valid = [r for r in metrics if "valid_acc" in r]
    assert [r["step"] for r in valid] == [2, 4] and all(0 <= r["valid_acc"] <= 1 for r in valid)
    # best + the newest 2 checkpoints are kept; each loads as a speech LLM checkpoint
    best = summary["best_step"]
    assert sorted(p.name for p in train.checkpoints(out)) == sorted({f"step_{s:06d}" for s in (3, 4, best)})
    assert (out / "best").resolve().name == f"step_{best:06d}"
    assert not list(out.glob(".tmp*"))
    info = SpeechLLM.checkpoint_info(out / "step_000004")
    assert info["meta"]["layers"] == [0, 1] and info["meta"]["step"] == 4
    assert info["sources"]["llm"] == str(setup["llm"])
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
    state = train.load_checkpoint_state(out / "step_000004")
    assert state["step"] == 4 and state["best_step"] == best


def _train_with_threads(threads, args):
    torch.set_num_threads(threads)
    train.main(args)


def test_resume_after_kill_is_bitwise(reference, setup):
    ref_out, _ = reference
    out = setup["dir"] / "killed"
    args = argv(setup, out, *REFERENCE, "--valid", setup["valid"])
    # a spawned child with this process's torch thread count (bitwise equality needs the same count). Not a
    # forked one: a fork of a process whose OpenMP pool has run (OMP_NUM_THREADS=2) deadlocks in its first kernel.
    proc = multiprocessing.get_context("spawn").Process(target=_train_with_threads,
                                                        args=(torch.get_num_threads(), args))
    proc.start()
    try:
        deadline = time.time() + 60
        while not (out / "step_000002").is_dir():
            assert proc.is_alive() and time.time() < deadline
            time.sleep(0.002)
    finally:
        os.kill(proc.pid, signal.SIGKILL)              # in the middle of step 3 (or of writing its checkpoint)
        proc.join()
    assert proc.exitcode == -signal.SIGKILL and not (out / "step_000004").exists()
    train.main(args + ["--resume"])
    ref = [r for r in train.read_metrics(ref_out / "metrics.jsonl")]
    got = [r for r in train.read_metrics(out / "metrics.jsonl")]
    speed = {"samples_per_s", "tokens_per_s", "peak_mem_gib"}
    assert [{k: v for k, v in r.items() if k not in speed} for r in got] == \
        [{k: v for k, v in r.items() if k not in speed} for r in ref]      # every loss, lr, norm: bitwise
    a, b = trainable(ref_out / "step_000004"), trainable(out / "step_000004")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = (train.load_checkpoint_state(o / "step_000004")["optimizer"]["state"] for o in (ref_out, out))
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)


def _ddp_worker(rank, args, port, threads):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(threads)        # the reference's count: the kernels then sum in the reference's order
    train.main(args)


def test_two_gloo_processes_equal_one_with_accumulation(reference, setup):
    ref_out, _ = reference
    out = setup["dir"] / "ddp"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # micro-batch 2 x 2 processes x accumulation 1 = the reference's 2 x 1 x 2
    # spawned, not forked: a fork of a process whose OpenMP pool has run (OMP_NUM_THREADS=2) deadlocks
    torch.multiprocessing.start_processes(
        _ddp_worker, (argv(setup, out, *REFERENCE, "--valid", setup["valid"]), port, torch.get_num_threads()),
        nprocs=2, start_method="spawn")
    a, b = trainable(ref_out / "step_000004"), trainable(out / "step_000004")
    # float32: the gradients are summed in another order (all-reduce vs accumulation), ~1e-7 relative
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    ref, got = (train.read_metrics(o / "metrics.jsonl") for o in (ref_out, out))
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    for r, g in zip(ref, got):
        for k in ("loss", "ce", "w0", "w1", "valid_loss", "valid_acc"):
            if k in r:
                assert g[k] == pytest.approx(r[k], rel=1e-5, abs=1e-6), (r["step"], k)


def test_cached_encoders_train_as_micro_batch_one_without_the_cache(setup):
    # at micro-batch 1 a clip is alone in its batch with or without the cache: the same run, the cache then
    # skipping the features and encoders of the utterances it has seen (4 steps over 2 utterances)
    runs = {}
    for name, extra in (("plain", []), ("cached", ["--cache-encoders"])):
        out = setup["dir"] / f"mb1_{name}"
        train.main(argv(setup, out, "--layers", "0-1", "--global-batch", "2", "--micro-batch", "1", "--steps", "4",
                        "--warmup", "1", "--lr", "1e-2", "--train", setup["valid"], *extra))
        runs[name] = out
    assert json.loads((runs["cached"] / "args.json").read_text())["cache_encoders"] is True
    a, b = (trainable(runs[n] / "step_000004") for n in ("plain", "cached"))
    # float32: the same arithmetic, except BEATs' all-False padding mask against none (~1e-7 relative)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    ref, got = (train.read_metrics(runs[n] / "metrics.jsonl") for n in ("plain", "cached"))
    assert [r["ce"] for r in got] == pytest.approx([r["ce"] for r in ref], rel=1e-5)


def test_ctc_head_is_saved_with_the_checkpoint_and_resumed(setup):
    out = setup["dir"] / "ctc"
    args = argv(setup, out, "--align", "ctc", "--global-batch", "2", "--micro-batch", "2", "--steps", "2",
                "--warmup", "1", "--save-every", "1")
    first = train.main(args)
    head = load_file(str(out / "step_000002" / train.CTC_FILE))
    cfg = train.LLMConfig.from_dir(setup["llm"])
    assert head["weight"].shape == (cfg.vocab_size + 1, cfg.hidden_size)      # the vocabulary + a blank
    final = train.read_metrics(out / "metrics.jsonl")[-1]
    assert "ctc" in final and final["loss"] == pytest.approx(0.99 * final["ce"] + 0.01 * final["ctc"], rel=1e-5)
    shutil.rmtree(out / "step_000002")
    again = train.main(args + ["--resume"])                  # from step 1: the head comes back from its file
    assert again["final_loss"] == first["final_loss"]
    assert torch.equal(load_file(str(out / "step_000002" / train.CTC_FILE))["weight"], head["weight"])


def test_early_stopping_fires_after_the_patience(setup):
    out = setup["dir"] / "early"
    # a learning rate too small to change any argmax: the accuracy never beats its first value
    summary = train.main(argv(setup, out, "--align", "none", "--global-batch", "2", "--micro-batch", "2",
                              "--steps", "20", "--warmup", "1", "--lr", "1e-12", "--warmup-lr", "1e-12",
                              "--min-lr", "1e-12", "--valid", setup["valid"], "--eval-every", "1",
                              "--patience", "2", "--save-every", "100"))     # saved at each validation anyway
    assert summary["steps"] == 3 and summary["best_step"] == 1 and "2 validations" in summary["stopped_early"]
    valid = [r for r in train.read_metrics(out / "metrics.jsonl") if "valid_acc" in r]
    assert [r["bad_validations"] for r in valid] == [0, 1, 2]
    assert (out / "best").resolve().name == "step_000001" and (out / "step_000003").is_dir()


def test_nan_stops_naming_step_terms_and_ids(setup, monkeypatch):
    out = setup["dir"] / "nan"
    real = train.compute_losses
    calls = []

    def poisoned(model, batch, *a, **k):
        loss, terms = real(model, batch, *a, **k)
        calls.append(batch.ids)
        if len(calls) == 3:          # the first micro-batch of the second step
            loss = loss * float("nan")
            terms = {**terms, "loss": loss}
        return loss, terms

    monkeypatch.setattr(train, "compute_losses", poisoned)
    args = argv(setup, out, "--layers", "0", "--global-batch", "4", "--micro-batch", "2", "--steps", "5",
                "--warmup", "1", "--save-every", "1", "--patience", "0")
    with pytest.raises(SystemExit, match=r"step 2: non-finite .*micro-batch 0: loss nan, ce [\d.e+-]+, w0 [\d.e+-]+ "
                                         r"\(ids: train_\d, train_\d\)"):
        train.main(args)
    assert [p.name for p in train.checkpoints(out)] == ["step_000001"]      # the last good one, untouched
    assert all(torch.isfinite(v).all() for v in trainable(out / "step_000001").values())


def test_stage1_from_scratch_builds_the_bridge_of_qformer(setup):
    out = setup["dir"] / "stage1_fresh"
    train.main(argv(setup, out, "--stage", "pretrain", "--init", "", "--qformer", "hidden=16,n_head=2,ffn=24",
                    "--lora", "r=4,dropout=0", "--global-batch", "2", "--micro-batch", "2", "--steps", "1",
                    "--warmup", "0"))
    saved = SpeechLLM.saved_config(out / "step_000001")
    q = saved.qformer
    assert (q.hidden, q.n_head, q.ffn, q.llm_hidden) == (16, 2, 24, 32)
    assert (saved.lora_r, saved.lora_alpha, saved.lora_dropout) == (4, 32.0, 0.0)     # alpha: SALMONN's default


def test_mixed_manifests_follow_their_weights(setup):
    args = train.build_parser().parse_args(argv(setup, setup["dir"] / "mix", "--align", "none", "--stage", "pretrain",
                                                "--train", f"{setup['train']}:2", f"{setup['aac']}:0.5",
                                                "--global-batch", "9", "--micro-batch", "9"))
    train.check_args(args, world=1)
    assert args.train_data.weights == [2.0, 0.5] and args.train_data.sizes == [4, 2]
    ctx = train.Context(torch.device("cpu"), torch.float32)
    [(k, batch)] = next(train.micro_batches(args, ctx, 0))       # one epoch: 4 x 2 + 2 x 0.5 = 9 utterances
    epoch = batch.ids
    assert sorted(epoch.count(f"train_{i}") for i in range(4)) == [2] * 4
    assert sum(epoch.count(f"aac_{i}") for i in range(2)) == 1


# ---------------------------------------------------------------- every bad argument, before any model loads

@pytest.fixture
def no_loading(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(train, "load_model", fail)


BAD = [
    (("--layers", "0", "--train", "nowhere.jsonl"), r"manifest nowhere.jsonl not found"),
    (("--layers", "0", "--train", "{train}:-1"), r"weight must be a positive number"),
    (("--align", "ot"), r"--align ot needs --layers"),
    (("--layers", "0-7"), r"layer\(s\) \[4, 5, 6, 7\] outside 0..3"),
    (("--layers", "nothing.json"), r"--layers nothing.json: file not found"),
    (("--layers", "0", "--global-batch", "6", "--micro-batch", "4"), r"--global-batch 6 is not a multiple"),
    (("--layers", "0", "--alpha", "1"), r"--alpha 1.0: must lie in \(0, 1\)"),
    (("--stage", "pretrain", "--align", "ot", "--layers", "0"), r"stage 1 .* trains with CE only"),
    (("--align", "ctc", "--layers", "0-1"), r"--align ctc works at layer 0"),
    (("--align", "contrastive", "--micro-batch", "1"), r"needs --micro-batch >= 2"),
    (("--init", "", "--layers", "0"), r"--stage joint starts from the stage-1 checkpoint"),
    (("--init", "nowhere", "--layers", "0"), r"--init nowhere: no such file"),
    (("--layers", "0", "--patience", "2"), r"--patience 2 needs --valid"),
    (("--layers", "0", "--warmup", "10", "--steps", "10"), r"--warmup 10 must be below --steps 10"),
    (("--layers", "0", "--beats", "nowhere.pt"), r"--beats nowhere.pt: no such file"),
    (("--layers", "0", "--backbone", "qwen2-7b", "--llm", "{llm}"),
     r"is another model: hidden_size 32 \(preset 3584\)"),
    (("--stage", "pretrain", "--init", "", "--backbone", "qwen2-7b"),
     r"not in the Hugging Face cache.*\n    hf download Qwen/Qwen2-7B$"),
    (("--layers", "0", "--whisper", "openai/whisper-large-v2"),
     r"hf download openai/whisper-large-v2 --include config.json model.safetensors"),
    (("--layers", "0", "--train", "{aac}"),
     r"aac.jsonl: entry 'aac_0' \(task aac\) has no 'transcript'; --align ot needs"),
    (("--layers", "0", "--train", "{broken}"), r"broken.jsonl:2: field 'translation' is missing"),
    (("--layers", "0", "--train", "{missing_audio}"), r"1 of 1 audio files are missing \(m0: .*gone.wav"),
    (("--layers", "0", "--qformer", "hidden=16,n_head=2"), r"--qformer: the bridge of --init .*stage1 has its own shape"),
    (("--stage", "pretrain", "--init", "", "--qformer", "width=16"), r"--qformer width=16: unknown field 'width'"),
    (("--stage", "pretrain", "--init", "", "--qformer", "hidden=30,n_head=4"),
     r"--qformer hidden=30,n_head=4: .*hidden=30 is not a multiple of n_head=4"),
    (("--layers", "0", "--lora", "dropout=0"), r"--lora: the LoRA of --init .*stage1 has its own settings"),
    (("--stage", "pretrain", "--init", "", "--lora", "rank=4"), r"--lora rank=4: unknown field 'rank'"),
    (("--stage", "pretrain", "--init", "", "--lora", "dropout=1"), r"--lora dropout=1: dropout=1 is out of range"),
    (("--stage", "pretrain", "--init", "", "--lora", "r=2.5"), r"--lora r=2.5: r='2.5' is not an integer"),
    (("--layers", "0", "--backbone", "{other_llm}"), r"stage1 was trained on an LLM with hidden_size=32, but .* has "
                                                     r"hidden_size=64: another backbone"),
]


@pytest.mark.parametrize("extra, message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_arguments_fail_before_loading(setup, no_loading, monkeypatch, tmp_path, extra, message):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    d = setup["dir"]
    (d / "broken.jsonl").write_text((setup["train"].read_text().splitlines()[0] + "\n")
                                    + json.dumps({"id": "x", "audio": "clips/train_0.wav", "task": "st", "lang": "en",
                                                  "tgt_lang": "zh", "transcript": "hello"}) + "\n")
    (d / "missing_audio.jsonl").write_text(json.dumps({"id": "m0", "audio": "gone.wav", "task": "asr",
                                                       "transcript": "hello"}) + "\n")
    other = tmp_path / "other_llm"          # the tiny LLM's files with a wider config: another backbone
    shutil.copytree(setup["llm"], other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "hidden_size": 64}))
    fill = {"train": setup["train"], "aac": setup["aac"], "llm": setup["llm"], "broken": d / "broken.jsonl",
            "missing_audio": d / "missing_audio.jsonl", "other_llm": other}
    extra = [e.format(**fill) for e in extra]
    with pytest.raises(SystemExit, match=message):
        train.main(argv(setup, tmp_path / "out", *extra))


def test_existing_run_needs_resume_and_the_same_settings(reference, setup, no_loading):
    out, _ = reference
    with pytest.raises(SystemExit, match=r"already holds a run \(newest: step_000004\); add --resume"):
        train.main(argv(setup, out, *REFERENCE))
    with pytest.raises(SystemExit, match=r"--resume: .* other settings: .*lr: 0.01 -> 0.001"):
        train.main(argv(setup, out, *REFERENCE, "--valid", setup["valid"], "--lr", "1e-3", "--resume"))
    lines = setup["train"].read_text()
    try:      # the same manifest path with one more line: the data stream would not be the same
        setup["train"].write_text(lines + json.dumps({**json.loads(lines.splitlines()[0]), "id": "extra"}) + "\n")
        with pytest.raises(SystemExit, match=r"train_sizes: \[4\] -> \[5\]"):
            train.main(argv(setup, out, *REFERENCE, "--valid", setup["valid"], "--resume"))
    finally:
        setup["train"].write_text(lines)


def test_hub_ids_resolve_from_the_local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--Qwen--Qwen2-7B"
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "old").mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123\n")
    assert train.resolve_weights("Qwen/Qwen2-7B", "--llm") == repo / "snapshots" / "abc123"
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert train.hf_hub_cache() == tmp_path / "home" / "hub"

