#!/usr/bin/env bash
# The quality table of docs/performance.md: perplexity of SmolLM2 on data/perplexity-english.txt for the
# float model and each compressed format, and int4 g64 calibrated on docs/guide.md (another text than the
# one scored). Usage: scripts/quant_quality.sh [MODEL] [DTYPE] [TEXT] [CHUNK]
# (MODEL defaults to smollm2, DTYPE to bfloat16, TEXT to data/perplexity-english.txt, CHUNK to 512: tokens
# a forward, `llmrun perplexity --chunk`, 1 for the path of generated tokens; LLMRUN_HOME as set, the
# store gets MODEL-int8-channel, MODEL-int8-g32, ...).
set -euo pipefail
model=${1:-smollm2}
dtype=${2:-bfloat16}
text=${3:-$(dirname "$0")/../data/perplexity-english.txt}
chunk=${4:-512}
calibration=$(dirname "$0")/../docs/guide.md
llmrun=(python -m llmrun)
ppl() { "${llmrun[@]}" perplexity "$1" "$text" --dtype "$dtype" --gpu-mem 0 --chunk "$chunk" --json "${@:2}"; }
ppl "$model"
for spec in "int8 0 int8-channel" "int8 32 int8-g32" "int4 32 int4-g32" "int4 64 int4-g64" "int4 128 int4-g128" \
            "int4 64 int4-g64-calibrated --calibrate $calibration"; do
    set -- $spec
    if "${llmrun[@]}" quantize "$model" --to "$1" --group "$2" --name "$model-$3" --force "${@:4}" 2>/dev/null; then
        ppl "$model-$3"
    else
        echo "{\"model\": \"$model-$3\", \"error\": \"$("${llmrun[@]}" quantize "$model" --to "$1" --group "$2" \
            --name "$model-$3" --force 2>&1 | tail -1)\"}"
    fi
done
