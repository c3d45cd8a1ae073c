"""The catalogue of bad inputs: each one must be refused with the expected exception and a message that names
the offending argument, file, line or key, before any model is loaded or any long computation starts.

One row per bad input in CASES: (id, provoke, error, names). `provoke(env)` makes the mistake; `names` is a
regex the message must match. A module adds its cases as more rows. `env` (class Env) gives each case a fresh
folder to write files in and `env.cli(...)`, which runs select_layers.py's command line with the model
loaders replaced by a tripwire: a check that comes only after a model is loaded trips it and fails the case.
"""
import json
import math
import shutil
from pathlib import Path
from typing import Callable, NamedTuple

import pytest
import torch

import model
import select_layers
from sinkhorn import ot_loss, relative_eps, sinkhorn, sq_euclidean_cost, wasserstein_matrix


class Case(NamedTuple):
    id: str
    provoke: Callable[["Env"], object]
    error: type
    names: str  # regex that the message must match


class ModelLoaded(Exception):
    """The tripwire: a model loader was called."""


def _tripwire(*args, **kwargs):
    raise ModelLoaded("a model loader was called before the bad input was refused")


TRANSCRIPTS = ["hello world", "this is a test", "numbers and spaces", "new lines", "it's fine", "the tokenizer"]


@pytest.fixture(scope="module")
def stage1(tiny_ckpts, tmp_path_factory):
    """A tiny stage-1 checkpoint (3 LLM layers) recording the tiny base weights' paths, and 6 short clips."""
    import numpy as np
    import soundfile as sf
    from conftest import TINY_QFORMER

    root = tmp_path_factory.mktemp("bad_inputs")
    m = model.SpeechLLM.from_pretrained(tiny_ckpts["llm"], tiny_ckpts["whisper"], tiny_ckpts["beats"],
                                        dtype=torch.float32, qformer=TINY_QFORMER, verbose=False)
    m.save_trainable(root / "stage1")
    (root / "clips").mkdir()
    t = np.arange(4000) / 16000
    for i in range(len(TRANSCRIPTS)):
        sf.write(root / "clips" / f"{i}.flac", (0.2 * np.sin(2 * np.pi * (200 + 50 * i) * t)).astype(np.float32), 16000)
    return dict(tiny_ckpts, ckpt=root / "stage1", clips=root / "clips")


class Env:
    """What a case needs: `tmp` (a fresh folder), the tiny checkpoints (built on first use), writers, and the
    command line."""

    def __init__(self, tmp: Path, request):
        self.tmp, self._request = tmp, request

    @property
    def paths(self) -> dict:
        return self._request.getfixturevalue("stage1")

    @property
    def ckpt(self) -> Path:
        return self.paths["ckpt"]

    def write(self, name: str, content) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
        return path

    def manifest(self, rows=None, name="m.jsonl", head="") -> Path:
        """A JSONL manifest (audio paths absolute) after `head` (e.g. blank lines); default: the 6 good rows."""
        if rows is None:
            rows = [{"audio": str(self.paths["clips"] / f"{i}.flac"), "transcript": w} for i, w in enumerate(TRANSCRIPTS)]
        return self.write(name, head + "".join(json.dumps(r) + "\n" for r in rows))

    def ckpt_with(self, **sources) -> Path:
        """A copy of the stage-1 checkpoint whose recorded base-weight paths are replaced by `sources`."""
        out = self.tmp / "ckpt_copy"
        shutil.copytree(self.ckpt, out)
        info = json.loads((out / "speech_llm.json").read_text())
        info["sources"].update({k: str(v) for k, v in sources.items()})
        (out / "speech_llm.json").write_text(json.dumps(info))
        return out

    def cli(self, **flags):
        """select_layers.main on the good command, with `flags` changed (num_pairs=0 -> --num-pairs 0; None
        drops a flag). Every model loader is a tripwire."""
        argv = {"ckpt": self.ckpt, "out": self.tmp / "out", "num_pairs": 4, "device": "cpu", **flags}
        if "data" not in argv:
            argv["data"] = self.manifest()
        args = []
        for k, v in argv.items():
            if v is not None:
                args += [f"--{k.replace('_', '-')}", str(v)]
        with pytest.MonkeyPatch.context() as mp:
            for cls in (model.SpeechLLM, model.LLM, model.WhisperEncoder, model.BEATs):
                for loader in ("from_pretrained", "from_checkpoint"):
                    if hasattr(cls, loader):
                        mp.setattr(cls, loader, _tripwire)
            return select_layers.main(args + ["--no-progress"])


@pytest.fixture
def env(tmp_path, request):
    return Env(tmp_path, request)


# ---------------------------------------------------------------- sinkhorn.py

def _pairs(d=4):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(3, d, generator=g), torch.randn(5, d, generator=g)]


def _wm(**kw):
    return wasserstein_matrix(_pairs(), _pairs(), progress=False, **kw)


def _xy():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 5, 4, generator=g), torch.randn(2, 3, 4, generator=g)


def _scaled(which: int, value: float):
    x, y = _xy()
    (x, y)[which][0, 0, 0] = value
    return x, y


def _huge_seq():
    s = _pairs()
    s[1] = torch.full((5, 4), 1e19)  # norm 2e19: its squared distances to the others, ~4e38, overflow float32
    return s


def _near_max():
    """Signed costs up to 3e38: the ε rule's double centring overflows float32 (it gave ε = inf, cost NaN)."""
    g = torch.Generator().manual_seed(5)
    return (torch.rand(1, 3, 3, generator=g) * 2 - 1) * 3e38


SINKHORN_CASES = [
    Case("wm-max-iter-0", lambda env: _wm(max_iter=0), ValueError, r"max_iter"),
    Case("wm-max-iter-float", lambda env: _wm(max_iter=10.5), ValueError, r"max_iter"),
    Case("wm-eps-rel-negative", lambda env: _wm(eps_rel=-1.0), ValueError, r"eps_rel"),
    Case("wm-eps-rel-nan", lambda env: _wm(eps_rel=math.nan), ValueError, r"eps_rel"),
    Case("wm-eps-rel-inf", lambda env: _wm(eps_rel=math.inf), ValueError, r"eps_rel"),
    Case("wm-tol-0", lambda env: _wm(tol=0.0), ValueError, r"tol"),
    Case("wm-tol-nan", lambda env: _wm(tol=math.nan), ValueError, r"tol"),
    Case("wm-tol-above-2", lambda env: _wm(tol=3.0), ValueError, r"tol"),
    Case("wm-omega-2", lambda env: _wm(omega=2.0), ValueError, r"omega"),
    Case("wm-omega-nan", lambda env: _wm(omega=math.nan), ValueError, r"omega"),
    Case("wm-max-bytes-0", lambda env: _wm(max_bytes=0), ValueError, r"max_bytes"),
    Case("wm-max-bytes-inf", lambda env: _wm(max_bytes=math.inf), ValueError, r"max_bytes"),
    Case("wm-speech-norm-1e19", lambda env: wasserstein_matrix(_huge_seq(), _pairs(), progress=False),
         ValueError, r"speech\[1\].*1\.0e\+19.*overflow"),
    Case("wm-text-norm-1e20", lambda env: wasserstein_matrix(_pairs(), [t * 1e20 for t in _pairs()], progress=False),
         ValueError, r"text\[\d\].*overflow"),
    Case("wm-speech-is-a-tensor", lambda env: wasserstein_matrix(torch.randn(2, 3, 4), _pairs(), progress=False),
         ValueError, r"speech must be a non-empty list"),
    Case("wm-text-nan", lambda env: wasserstein_matrix(_pairs(), [_pairs()[0], torch.full((2, 4), math.nan)],
                                                      progress=False), ValueError, r"text\[1\] contains NaN"),
    Case("sinkhorn-max-iter-0", lambda env: sinkhorn(torch.rand(1, 2, 2), max_iter=0), ValueError, r"max_iter"),
    Case("sinkhorn-tol-inf", lambda env: sinkhorn(torch.rand(1, 2, 2), tol=math.inf), ValueError, r"tol"),
    Case("sinkhorn-eps-rel-inf", lambda env: sinkhorn(torch.rand(1, 2, 2), eps_rel=math.inf), ValueError, r"eps_rel"),
    Case("sinkhorn-eps-wrong-shape", lambda env: sinkhorn(torch.rand(2, 2, 2), eps=torch.ones(3)), ValueError,
         r"eps .*\(2,\)"),
    Case("sinkhorn-eps-overflows-C", lambda env: sinkhorn(torch.rand(1, 2, 2) + 1, eps=1e-40), ValueError,
         r"eps.*C ?/ ?eps"),
    Case("sinkhorn-C-near-max", lambda env: sinkhorn(_near_max()), ValueError, r"C: \|values\| up to 2\.\de\+38"),
    Case("sinkhorn-C-nan", lambda env: sinkhorn(torch.full((1, 2, 2), math.nan)), ValueError, r"C contains NaN"),
    Case("sinkhorn-C-not-3d", lambda env: sinkhorn(torch.rand(2, 2)), ValueError, r"C must be a \(B, n, m\)"),
    Case("relative-eps-eps-rel-negative", lambda env: relative_eps(torch.rand(1, 2, 2), eps_rel=-1.0), ValueError,
         r"eps_rel"),
    Case("relative-eps-C-a-list", lambda env: relative_eps([[[1.0]]]), ValueError, r"C must be a \(B, n, m\)"),
    Case("relative-eps-C-inf", lambda env: relative_eps(torch.full((1, 2, 2), math.inf)), ValueError,
         r"C contains NaN or inf"),
    Case("cost-x-nan", lambda env: sq_euclidean_cost(*_scaled(0, math.nan)), ValueError, r"^x contains NaN"),
    Case("cost-y-1e20", lambda env: sq_euclidean_cost(*_scaled(1, 1e20)), ValueError, r"^y: .*1\.0e\+20.*overflow"),
    Case("ot-loss-h-speech-1e20", lambda env: ot_loss(*_scaled(0, 1e20)), ValueError,
         r"^h_speech: .*1\.0e\+20.*overflow"),
    Case("ot-loss-h-text-inf", lambda env: ot_loss(*_scaled(1, math.inf)), ValueError, r"^h_text contains NaN or inf"),
    Case("ot-loss-max-iter-0", lambda env: ot_loss(*_xy(), max_iter=0), ValueError, r"max_iter"),
    Case("ot-loss-omega-0", lambda env: ot_loss(*_xy(), omega=0.0), ValueError, r"omega"),
    Case("ot-loss-eps-negative", lambda env: ot_loss(*_xy(), eps=-1.0), ValueError, r"eps"),
    Case("ot-loss-int-hidden-states", lambda env: ot_loss(torch.ones(1, 2, 3, dtype=torch.long), torch.rand(1, 2, 3)),
         ValueError, r"h_speech must be a floating-point"),
    Case("ot-loss-mask-shape", lambda env: ot_loss(*_xy(), torch.ones(2, 4, dtype=torch.bool)), ValueError,
         r"speech_mask must have shape \(2, 5\)"),
]


# ---------------------------------------------------------------- select_layers.py's command line

def _rows(env, edit):
    """The good manifest rows with edit(rows) applied."""
    rows = [{"audio": str(env.paths["clips"] / f"{i}.flac"), "transcript": w} for i, w in enumerate(TRANSCRIPTS)]
    edit(rows)
    return rows


def _set(rows, i, **kw):
    rows[i].update(kw)


def _llm_with_layers(env, n):
    cfg = json.loads((env.paths["llm"] / "config.json").read_text())
    return env.write("other_llm/config.json", json.dumps(dict(cfg, num_hidden_layers=n))).parent


CLI_CASES = [
    Case("cli-ckpt-missing", lambda env: env.cli(ckpt=env.tmp / "nope"), SystemExit, r"nope: no such checkpoint"),
    Case("cli-ckpt-dir-without-config", lambda env: env.cli(ckpt=env.write("empty/x", "").parent), SystemExit,
         r"empty.*speech_llm\.json"),
    Case("cli-out-is-a-file", lambda env: env.cli(out=env.write("taken", "")), SystemExit, r"--out .*taken"),
    Case("cli-out-under-a-file", lambda env: env.cli(out=env.write("taken", "") / "sub"), SystemExit,
         r"--out .*taken/sub"),
    Case("cli-num-pairs-0", lambda env: env.cli(num_pairs=0), SystemExit, r"--num-pairs 0"),
    Case("cli-num-pairs-negative", lambda env: env.cli(num_pairs=-1), SystemExit, r"--num-pairs -1"),
    Case("cli-num-pairs-1", lambda env: env.cli(num_pairs=1), SystemExit, r"--num-pairs 1: .*at least 2"),
    Case("cli-num-pairs-above-entries", lambda env: env.cli(num_pairs=9), SystemExit, r"--num-pairs 9 but .*6 entries"),
    Case("cli-duplicate-audio", lambda env: env.cli(num_pairs=6, data=env.manifest(_rows(
        env, lambda r: _set(r, 4, audio=r[1]["audio"])))), SystemExit, r"m\.jsonl: lines 2 and 5 .*same audio"),
    Case("cli-duplicate-transcript", lambda env: env.cli(num_pairs=6, data=env.manifest(_rows(
        env, lambda r: _set(r, 5, transcript=r[0]["transcript"])), head="\n\n")), SystemExit,
         r"m\.jsonl: lines 3 and 8 .*same transcript 'hello world'"),  # the lines of the file, blank ones counted
    Case("cli-batch-size-0", lambda env: env.cli(batch_size=0), SystemExit, r"--batch-size 0"),
    Case("cli-layers-reversed", lambda env: env.cli(layers="3-1"), SystemExit, r"--layers '3-1'"),
    Case("cli-layers-out-of-range", lambda env: env.cli(layers="0-9"), SystemExit, r"--layers '0-9'.*outside 0\.\.3"),
    Case("cli-layers-garbage", lambda env: env.cli(layers="first"), SystemExit, r"--layers 'first'"),
    Case("cli-threshold-2", lambda env: env.cli(threshold=2), SystemExit, r"--threshold 2"),
    Case("cli-threshold-negative", lambda env: env.cli(threshold=-1), SystemExit, r"--threshold -1"),
    Case("cli-threshold-nan", lambda env: env.cli(threshold="nan"), SystemExit, r"--threshold nan"),
    Case("cli-eps-rel-0", lambda env: env.cli(eps_rel=0), SystemExit, r"--eps-rel 0"),
    Case("cli-tol-0", lambda env: env.cli(tol=0), SystemExit, r"--tol 0"),
    Case("cli-tol-nan", lambda env: env.cli(tol="nan"), SystemExit, r"--tol nan"),
    Case("cli-max-iter-0", lambda env: env.cli(max_iter=0), SystemExit, r"--max-iter 0"),
    Case("cli-max-bytes-0", lambda env: env.cli(max_bytes=0), SystemExit, r"--max-bytes 0"),
    Case("cli-several-bad-numbers-at-once", lambda env: env.cli(batch_size=0, tol=5, max_iter=-3), SystemExit,
         r"(?s)3 problems.*--batch-size 0.*--tol 5.*--max-iter -3"),
    Case("cli-llm-missing", lambda env: env.cli(llm=env.tmp / "no_llm"), SystemExit, r"--llm .*no_llm"),
    Case("cli-llm-without-config", lambda env: env.cli(llm=env.write("bare/weights", "").parent), SystemExit,
         r"bare/config\.json: not found"),
    Case("cli-whisper-missing", lambda env: env.cli(whisper=env.tmp / "no_whisper"), SystemExit,
         r"--whisper .*no_whisper"),
    Case("cli-beats-missing", lambda env: env.cli(beats=env.tmp / "no_beats.pt"), SystemExit, r"--beats .*no_beats"),
    Case("cli-recorded-whisper-missing", lambda env: env.cli(ckpt=env.ckpt_with(whisper=env.tmp / "gone")), SystemExit,
         r"whisper .*gone.*recorded in .*speech_llm\.json"),
    Case("cli-llm-other-size", lambda env: env.cli(llm=_llm_with_layers(env, 5)), SystemExit,
         r"stage1 was trained on an LLM with num_hidden_layers=3, but .*other_llm has num_hidden_layers=5"),
    Case("cli-salmonn-pth-needs-llm", lambda env: env.cli(ckpt=env.write("salmonn.pth", b"x")), SystemExit,
         r"--llm is required"),
    Case("cli-audio-missing", lambda env: env.cli(num_pairs=6, data=env.manifest(_rows(
        env, lambda r: (_set(r, 2, audio="gone.flac"), _set(r, 4, audio="gone2.wav"))))), SystemExit,
         r"(?s)2 of 6.*m\.jsonl:3: .*gone\.flac.*m\.jsonl:5: .*gone2\.wav"),
    Case("cli-audio-not-audio", lambda env: env.cli(num_pairs=6, data=env.manifest(_rows(
        env, lambda r: _set(r, 1, audio=str(env.write("text.flac", "not audio")))))), SystemExit,
         r"m\.jsonl:2: .*text\.flac"),
    Case("cli-audio-segment-outside", lambda env: env.cli(num_pairs=6, data=env.manifest(_rows(
        env, lambda r: _set(r, 3, start=0.1, end=9.0)))), SystemExit, r"m\.jsonl:4: segment \[0\.1, 9\.0\) s is not inside"),
    Case("cli-manifest-missing", lambda env: env.cli(data=env.tmp / "none.jsonl"), SystemExit, r"none\.jsonl"),
    Case("cli-manifest-bad-json", lambda env: env.cli(data=env.write("m.jsonl", '{"audio": "a.flac", "transcript": "a"}\n{oops\n')),
         SystemExit, r"m\.jsonl:2"),
    Case("cli-manifest-no-transcript", lambda env: env.cli(data=env.manifest(_rows(
        env, lambda r: r[2].pop("transcript")))), SystemExit, r"m\.jsonl:3: .*transcript"),
    Case("cli-problems-of-every-kind-at-once", lambda env: env.cli(
        threshold=2, whisper=env.tmp / "no_whisper", out=env.write("taken", ""), num_pairs=6,
        data=env.manifest(_rows(env, lambda r: _set(r, 2, audio="gone.flac")))), SystemExit,
         r"(?s)4 problems, nothing was loaded.*--threshold 2.*--whisper .*no_whisper.*m\.jsonl:3: .*gone\.flac"
         r".*--out .*taken"),
    Case("cli-device-unknown", lambda env: env.cli(device="tpu7"), SystemExit, r"--device 'tpu7'"),
    Case("cli-instruction-empty", lambda env: env.cli(instruction=" "), SystemExit, r"--instruction"),
]

# ---------------------------------------------------------------- model.py: checkpoints and base weights

def _llm_int32(env):
    """The tiny LLM with one weight stored as int32 values (a broken conversion)."""
    from safetensors.torch import load_file, save_file
    d = env.tmp / "int_llm"
    shutil.copytree(env.paths["llm"], d)
    f = next(d.glob("*.safetensors"))
    sd = load_file(f)
    sd["model.norm.weight"] = sd["model.norm.weight"].to(torch.int32)
    save_file(sd, f)
    return model.LLM.from_pretrained(d)


def _without_loading(fn):
    """fn() with every weight loader a tripwire: the error must come from the checks before loading."""
    with pytest.MonkeyPatch.context() as mp:
        for cls in (model.LLM, model.WhisperEncoder, model.BEATs):
            mp.setattr(cls, "from_pretrained", _tripwire)
        mp.setattr(model, "read_file", _tripwire)
        return fn()


MODEL_CASES = [
    Case("llm-int32-weights", _llm_int32, model.CheckpointError,
         r"model\.safetensors: key model\.norm\.weight holds torch\.int32 values"),
    Case("llm-folder-without-config", lambda env: model.LLM.from_pretrained(env.write("w/x", "").parent),
         model.CheckpointError, r"w/config\.json: not found"),
    Case("llm-config-not-json", lambda env: model.LLM.from_pretrained(env.write("c/config.json", "{oops").parent),
         model.CheckpointError, r"c/config\.json: not valid JSON"),
    Case("llm-unsupported-architecture", lambda env: model.LLM.from_pretrained(env.write("g/config.json", json.dumps(
        {"architectures": ["GPT2LMHeadModel"]})).parent), model.CheckpointError, r"config\.json: unsupported architecture"),
    Case("tokenizer-missing", lambda env: model.load_tokenizer(env.tmp), model.CheckpointError,
         r"no tokenizer\.model .*or tokenizer\.json"),
    Case("whisper-path-missing", lambda env: model.WhisperEncoder.from_pretrained(env.tmp / "no_whisper"),
         model.CheckpointError, r"no_whisper: no such file or directory"),
    Case("beats-is-a-text-file", lambda env: model.BEATs.from_pretrained(env.write("beats.pt", "not a checkpoint")),
         model.CheckpointError, r"beats\.pt: not a torch checkpoint"),
    Case("beats-is-a-state-dict", lambda env: model.BEATs.from_pretrained(
        (torch.save({"w": torch.ones(1)}, env.tmp / "sd.pt"), env.tmp / "sd.pt")[1]),
         model.CheckpointError, r"sd\.pt: not an official BEATs checkpoint.*found keys w"),
    Case("trainable-ckpt-missing", lambda env: model.SpeechLLM.resolve(env.tmp / "nope"), model.CheckpointError,
         r"nope: no such checkpoint"),
    Case("ckpt-of-another-backbone", lambda env: _without_loading(lambda: model.SpeechLLM.from_pretrained(
        _llm_with_layers(env, 5), env.paths["whisper"], env.paths["beats"], ckpt=env.ckpt)),
         model.CheckpointError, r"stage1 was trained on an LLM with num_hidden_layers=3, but .*other_llm has "
                                r"num_hidden_layers=5"),
    Case("ckpt-recorded-whisper-gone", lambda env: _without_loading(lambda: model.SpeechLLM.from_checkpoint(
        env.ckpt_with(whisper=env.tmp / "gone"))), model.CheckpointError, r"gone: no such file .*recorded in"),
    Case("ckpt-with-beats-given-none", lambda env: model.SpeechLLM.resolve(env.ckpt, beats="none"),
         model.CheckpointError, r"stage1 was trained with BEATs, but beats is none"),
    Case("ckpt-of-another-whisper", lambda env: model.SpeechLLM.resolve(env.ckpt, whisper=env.write(
        "w2/config.json", json.dumps(dict(json.loads((env.paths["whisper"] / "config.json").read_text()),
                                          d_model=32))).parent),
         model.CheckpointError, r"stage1 was trained on another Whisper encoder than .*w2/config\.json"),
    Case("salmonn-ckpt-without-base-weights", lambda env: model.SpeechLLM.resolve(env.write("s.pth", b"x")),
         model.CheckpointError, r"--llm is required: .*s\.pth records no llm path"),
]

CASES = SINKHORN_CASES + CLI_CASES + MODEL_CASES


def test_case_ids_are_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_by_name(case, env):
    with pytest.raises(case.error, match=case.names):
        case.provoke(env)


def test_the_good_command_passes_every_check(env, capsys):
    """The control: the command the CLI cases start from passes every check and reaches the model loader, so
    each case is refused for the one thing it changed. Its 4 pairs are too few, and it says so."""
    with pytest.raises(ModelLoaded):
        env.cli()
    assert "with 4 pairs the chance MRR is 0.521 >= --threshold 0.05" in capsys.readouterr().err
    with pytest.raises(ModelLoaded):
        env.cli(num_pairs=6, threshold=0.5)  # chance 0.408 < 0.5: no warning
    assert "chance" not in capsys.readouterr().err
