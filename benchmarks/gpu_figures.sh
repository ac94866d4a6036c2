#!/usr/bin/env bash
# Every GPU figure the README asks for, in one run on one CUDA GPU (estimated 10 minutes on an H100/H200,
# not yet measured):
#   0. tests/test_cuda.py: the CUDA paths against the CPU's (seconds; a failure is reported, the run goes on);
#   1. gpu_check.py on the Qwen3-Embedding-0.6B and -4B shapes, all layers, bfloat16: every stage, with the
#      one calibration pass and the sums in pinned host memory as extra rows (16 synthetic triples per side);
#   1b. on a machine with N >= 2 GPUs, the same on the 4B shape under torchrun --nproc_per_node N, with a row
#      for the sums sharded across the GPUs (the time against 1.'s: the scaling with N);
#   2. bench_inference.py on a random Qwen3-Embedding-0.6B-shaped model: dense against channel-pruned
#      against 2:4 semi-structured MLP weights, on CUDA only.
#
#   bash benchmarks/gpu_figures.sh            # the tables go to stdout and to $OUT (default output/gpu)
#   SHAPES="0.6B" TRIPLES=8 bash benchmarks/gpu_figures.sh
#
# Needs about 41 GB of free disk for the 4B shape (gpu_check.py --help). Runs from a checkout without
# `pip install -e .`: the repository goes on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-output/gpu}"
SHAPES="${SHAPES:-0.6B 4B}"
TRIPLES="${TRIPLES:-16}"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
if [ -z "${WORK:-}" ]; then  # models and score files: a temporary folder unless WORK names one
    WORK="$(mktemp -d)"
    trap 'rm -rf "$WORK"' EXIT
fi
mkdir -p "$OUT" "$WORK"

"$PYTHON" -c "import sys, torch; torch.cuda.is_available() or sys.exit('no CUDA GPU here'); print(torch.__version__, torch.cuda.get_device_name())"
df -h "$WORK" | tail -1
"$PYTHON" -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.txt" | tail -n 3 \
    || echo "tests/test_cuda.py failed (or pytest is missing): see $OUT/test_cuda.txt" >&2

# shellcheck disable=SC2086  # SHAPES is a list
if ! "$PYTHON" benchmarks/gpu_check.py --shapes $SHAPES --triples "$TRIPLES" --one_pass --host_sums \
        --work_dir "$WORK" 2> "$OUT/gpu_check.log" | tee "$OUT/gpu_check.md"; then
    tail -n 30 "$OUT/gpu_check.log" >&2
    echo "gpu_check.py failed (the rows above are what finished); going on" >&2
fi

GPUS="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')"
if [ "$GPUS" -ge 2 ] && ! "$PYTHON" benchmarks/gpu_check.py --shapes 4B --triples "$TRIPLES" --one_pass \
        --sharded_sums --nproc "$GPUS" --work_dir "$WORK" 2> "$OUT/gpu_check_nproc.log" \
        | tee "$OUT/gpu_check_nproc.md"; then
    tail -n 30 "$OUT/gpu_check_nproc.log" >&2
    echo "gpu_check.py --nproc $GPUS failed (the rows above are what finished); going on" >&2
fi

"$PYTHON" - "$WORK/qwen3-0.6B" <<'BUILD'
import sys
import torch
from gaprune.toy_models import QWEN3_EMBEDDING_SHAPES, build_qwen3
shape = QWEN3_EMBEDDING_SHAPES["Qwen3-Embedding-0.6B"]
build_qwen3(sys.argv[1], hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"],
            num_layers=shape["num_hidden_layers"], num_heads=shape["num_attention_heads"],
            num_kv_heads=shape["num_key_value_heads"], head_dim=shape["head_dim"], vocab_size=shape["vocab_size"],
            tokenizer_vocab=2000, dtype=torch.bfloat16, device="cuda")
BUILD
if ! "$PYTHON" benchmarks/bench_inference.py --model "$WORK/qwen3-0.6B" --no-cpu 2> "$OUT/bench_inference.log" \
        | tee "$OUT/bench_inference.md"; then
    tail -n 30 "$OUT/bench_inference.log" >&2
    echo "bench_inference.py failed" >&2
    exit 1
fi
