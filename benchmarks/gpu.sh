#!/usr/bin/env bash
# Every GPU figure of BENCHMARKS.md in one command, for a lent GPU machine whose time is short: most important
# first, each under its own time limit and all under one budget, the logs in $OUT (default ./gpu_logs), a line
# per benchmark in $OUT/summary.txt (its exit status, seconds, last line).
#
#     OUT=gpu_logs bash benchmarks/gpu.sh [BUDGET_SECONDS [NAME ...]]     # default 520 s, every benchmark
#
# NAMEs (in the order they run): llm_qwen2 joint_step sinkhorn encoders decode_qwen2 llm_vicuna sinkhorn_1g
# sinkhorn_8g (the last two: the all-pairs Sinkhorn in 1- and 8-GiB chunks instead of the default, at most 32 GiB).
#
# Random weights at the real shapes (qwen2-7b, vicuna-13b-v1.1, whisper-large-v2, BEATs iter3+), bf16; nothing is
# downloaded. The machine needs torch with CUDA and transformers + peft (the references); soundfile,
# kaldi-native-fbank and POT may be missing: the benchmarks then skip what needs them and say so.
set -u
cd "$(dirname "$0")/.."
out=${OUT:-gpu_logs}
budget=${1:-520}
shift || true
only=" $* "   # the benchmarks to run (all when empty)
peak=${PEAK_TFLOPS:-989}   # dense bf16 TFLOP/s of an H100/H200 SXM
mkdir -p "$out"
start=$SECONDS

run() {  # run NAME LIMIT CMD...: at most LIMIT seconds, fewer if the budget has less left; skipped under 30
    local name=$1 limit=$2 left t0 rc
    shift 2
    if [[ "$only" != "  " && "$only" != *" $name "* ]]; then return; fi
    left=$((budget - (SECONDS - start)))
    if ((left < 30)); then
        echo "$name: skipped (${left} s of the budget left)" | tee -a "$out/summary.txt"
        return
    fi
    ((limit > left)) && limit=$left
    t0=$SECONDS
    echo "== $name (limit ${limit} s): $*" | tee -a "$out/summary.txt"
    timeout -k 10 "$limit" "$@" >"$out/$name.log" 2>&1
    rc=$?
    echo "$name: rc $rc in $((SECONDS - t0)) s; $(tail -n 1 "$out/$name.log")" | tee -a "$out/summary.txt"
}

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    python3 -c "import sys, torch, transformers, peft
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda,
      'transformers', transformers.__version__, 'peft', peft.__version__)"
    python3 -m pip list 2>/dev/null | grep -i -E "^(numpy|tqdm|safetensors|soundfile|pot|kaldi|sacrebleu) " || true
    nproc
} >"$out/env.log" 2>&1
cat "$out/env.log"

py="python3 -u"
run llm_qwen2 150 $py benchmarks/bench_llm.py --device cuda --preset qwen2-7b --dtype bf16 --batch 8 --prompt 512 \
    --new-tokens 128 --repeats 3 --fp32-check
run joint_step 210 $py benchmarks/bench_speech_llm.py --device cuda --real-size --batch 8 --peak-tflops "$peak" \
    --repeats 3
run sinkhorn 120 $py benchmarks/bench_sinkhorn.py --device cuda --n-speech 1000 --n-text 1000 --dim 3584 \
    --speech-len 88 88 --text-len 10 60 --pot-pairs 100 --emd-block 60 --repeat 2
run encoders 90 $py benchmarks/bench_audio.py --device cuda --dtype bf16 --real-size --batch 16 --encoders-only \
    --repeats 5 --peak-tflops "$peak"
run decode_qwen2 90 $py benchmarks/bench_decode.py --device cuda --preset qwen2-7b --dtype bf16 --batch 8 \
    --new-tokens 64 --repeats 3
run llm_vicuna 120 $py benchmarks/bench_llm.py --device cuda --preset vicuna-13b-v1.1 --dtype bf16 --batch 8 \
    --prompt 512 --new-tokens 128 --repeats 3
sink=(benchmarks/bench_sinkhorn.py --device cuda --n-speech 1000 --n-text 1000 --dim 3584 --speech-len 88 88
    --text-len 10 60 --pot-pairs 20 --emd-block 30 --repeat 1)
run sinkhorn_1g 80 $py "${sink[@]}" --max-bytes $((2**30))
run sinkhorn_8g 60 $py "${sink[@]}" --max-bytes $((8 * 2**30))
echo "total $((SECONDS - start)) s" | tee -a "$out/summary.txt"
