"""select_layers.py: MRR (Eq. 4) by hand, layer selection (Eq. 5) on tiny synthetic layers, and the
JSON/PNG outputs."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import select_layers
from select_layers import chance_mrr, layer_retrieval, load_results, mrr, save_results, select


def test_mrr_perfect_retrieval_is_one():
    D = torch.rand(6, 9) + 1.0
    D[torch.arange(6), torch.arange(6)] = 0.5  # every gold strictly closest, 3 extra distractor texts
    assert mrr(D) == 1.0


def test_mrr_hand_worked_example():
    D = torch.tensor([[1.0, 2.0, 3.0],  # gold closest: rank 1
                      [0.5, 1.0, 2.0],  # one closer text: rank 2
                      [2.0, 2.0, 2.0]])  # two ties with the gold, counted against it: rank 3
    assert mrr(D) == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)  # 11/18


def test_mrr_ties_count_against_the_gold():
    assert mrr(torch.ones(4, 4)) == pytest.approx(1 / 4)
    D = torch.tensor([[1.0, 1.0], [3.0, 2.0]])
    assert mrr(D) == pytest.approx((1 / 2 + 1) / 2)


def test_mrr_rejects_bad_input():
    with pytest.raises(ValueError, match="N <= M"):
        mrr(torch.rand(3, 2))
    with pytest.raises(ValueError, match="NaN"):
        mrr(torch.tensor([[0.0, float("nan")], [1.0, 0.0]]))
    with pytest.raises(ValueError, match=r"\(N, M\) tensor"):
        mrr(torch.rand(3))


def test_chance_and_threshold():
    assert chance_mrr(1) == 1.0 and chance_mrr(2) == 0.75
    assert chance_mrr(200) == pytest.approx(sum(1 / k for k in range(1, 201)) / 200)
    assert select({0: 0.9, 1: 0.05, 2: 0.051, 3: 0.01}) == [0, 2]  # strictly above 0.05 (Eq. 5)
    assert select({0: 0.9, 1: 0.3}, threshold=0.5) == [0]


def _layers(N=200, d=8, seed=0):
    """Layer 0: speech = its text with each token repeated, plus small noise (retrieval is easy).
    Layer 1: speech and text are unrelated noise (retrieval at chance)."""
    g = torch.Generator().manual_seed(seed)
    text = [torch.randn(int(torch.randint(1, 4, (1,), generator=g)), d, generator=g) for _ in range(N)]
    speech = [t.repeat_interleave(2, 0) + 0.05 * torch.randn(2 * len(t), d, generator=g) for t in text]
    noise_s = [torch.randn(int(torch.randint(2, 7, (1,), generator=g)), d, generator=g) for _ in speech]
    noise_t = [torch.randn(len(t), d, generator=g) for t in text]
    return {0: (speech, text), 1: (noise_s, noise_t)}


def test_layer_selection_on_synthetic_layers():
    states = _layers()
    seen = []
    result = layer_retrieval(states, progress=False, on_layer=lambda l, v: seen.append(l))
    assert seen == [0, 1] and result["layers"] == [0, 1]
    mrr_copy, mrr_noise = result["mrr"]
    assert mrr_copy == 1.0
    chance = chance_mrr(200)  # H_200 / 200 ≈ 0.029
    sd = math.sqrt((math.pi**2 / 6) / 200 - chance**2) / math.sqrt(200)  # std of a mean of 200 reciprocal ranks
    assert abs(mrr_noise - chance) < 4 * sd, (mrr_noise, chance)
    assert result["selected"] == [0]
    assert result["chance_mrr"] == pytest.approx(chance)
    assert all(c["unconverged_pairs"] == 0 for c in result["convergence"])
    # a generator yielding one layer at a time gives the same
    again = layer_retrieval(((l, s, t) for l, (s, t) in states.items()), progress=False)
    assert again["mrr"] == result["mrr"]


def test_layer_retrieval_rejects_inconsistent_layers():
    s, t = _layers(N=6)[0]
    with pytest.raises(ValueError, match="layer 1: 5 speech / 6 text"):
        layer_retrieval({0: (s, t), 1: (s[:5], t)}, progress=False)
    with pytest.raises(ValueError, match="more speech"):
        layer_retrieval({0: (s, t[:4])}, progress=False)
    with pytest.raises(ValueError, match="empty"):
        layer_retrieval({}, progress=False)


def test_json_and_png_are_written_and_round_trip(tmp_path):
    states = _layers(N=12)
    result = layer_retrieval(states, threshold=0.3, progress=False)
    json_path, png_path = save_results(result, tmp_path / "out", settings=dict(model="tiny", num_pairs=12))
    loaded = load_results(json_path)
    assert loaded == dict(result, settings={**result["settings"], "model": "tiny", "num_pairs": 12})
    assert loaded["threshold"] == 0.3 and loaded["selected"] == result["selected"]
    assert set(loaded["settings"]) >= {"eps_rel", "tol", "max_iter", "omega", "max_bytes", "device", "model"}
    assert json.loads(Path(json_path).read_text()) == loaded
    data = Path(png_path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_project_modules_import_neither_matplotlib_nor_pot():
    code = ("import sys; import sinkhorn, select_layers; "
            "bad = [m for m in ('matplotlib', 'ot') if m in sys.modules]; assert not bad, bad")
    root = Path(select_layers.__file__).resolve().parent
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)


# ---------------------------------------------------------------- the command line, end to end

def test_cli_end_to_end(tmp_path, tiny_ckpts):
    """A stage-1 checkpoint of a tiny speech LLM, a manifest of real audio files, the whole command."""
    import numpy as np
    import soundfile as sf

    from conftest import TINY_QFORMER
    from model import SpeechLLM

    model = SpeechLLM.from_pretrained(tiny_ckpts["llm"], tiny_ckpts["whisper"], tiny_ckpts["beats"],
                                      dtype=torch.float32, qformer=TINY_QFORMER, verbose=False)
    model.save_trainable(tmp_path / "stage1")
    (tmp_path / "clips").mkdir()
    words = ["hello world", "this is a test", "numbers and spaces", "new lines", "it's fine", "the tokenizer"]
    lines = []
    for i, w in enumerate(words):
        t = np.arange(int((1.0 + 0.3 * i) * 16000)) / 16000
        sf.write(tmp_path / "clips" / f"{i}.flac", (0.2 * np.sin(2 * np.pi * (200 + 50 * i) * t)).astype(np.float32), 16000)
        lines.append(json.dumps({"audio": f"clips/{i}.flac", "transcript": w}))
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")

    result = select_layers.main(["--ckpt", str(tmp_path / "stage1"), "--data", str(tmp_path / "m.jsonl"),
                                 "--num-pairs", "5", "--batch-size", "2", "--out", str(tmp_path / "out"),
                                 "--device", "cpu", "--no-progress"])
    saved = load_results(tmp_path / "out" / "layer_selection.json")
    assert saved["layers"] == [0, 1, 2, 3] and len(saved["mrr"]) == 4     # 3 blocks + the embeddings
    assert all(0 < v <= 1 for v in saved["mrr"])
    assert saved["selected"] == select(dict(zip(saved["layers"], saved["mrr"])), 0.05)
    assert saved["num_speech"] == 5 and len(saved["pairs"]) == 5
    assert saved["settings"]["llm_path"] == str(tiny_ckpts["llm"]) and saved["settings"]["seed"] == 0
    assert (tmp_path / "out" / "layer_selection.png").stat().st_size > 1000
    assert result["mrr"] == saved["mrr"]

    with pytest.raises(SystemExit, match="--num-pairs 9 but"):
        select_layers.main(["--ckpt", str(tmp_path / "stage1"), "--data", str(tmp_path / "m.jsonl"),
                            "--num-pairs", "9", "--out", str(tmp_path / "out2"), "--device", "cpu"])
    torch.save({"model": {}}, tmp_path / "salmonn.pth")
    with pytest.raises(SystemExit, match="--llm is required"):
        select_layers.main(["--ckpt", str(tmp_path / "salmonn.pth"), "--data", str(tmp_path / "m.jsonl"),
                            "--out", str(tmp_path / "out3"), "--device", "cpu"])


def test_parse_layers():
    assert select_layers.parse_layers("all", 3) == [0, 1, 2, 3]
    assert select_layers.parse_layers("0-1,3", 3) == [0, 1, 3]
    with pytest.raises(ValueError, match="outside 0..3"):
        select_layers.parse_layers("2-5", 3)
    with pytest.raises(ValueError, match="expected 'all'"):
        select_layers.parse_layers("x", 3)
    with pytest.raises(ValueError, match="'3-1' runs backwards"):
        select_layers.parse_layers("0,3-1", 3)
