#!/usr/bin/env bash
# The serving benchmark side by side: lm's api_server, `transformers serve --continuous-batching` and llama.cpp's
# llama-server, started in turn on this machine from the same GGUF (the default model, SmolLM2-135M-Instruct, or
# another known model: MODEL=gemma3-270m), each measured by the same `lm bench serve`, then one table with ratios.
# Not part of CI; see docs/benchmarks.md.
#
#   benchmarks/compare.sh                                   # ShareGPT, 128 prompts, 64 at once
#   benchmarks/compare.sh --dataset random --random-input-len 64 --random-output-len 256 --ignore-eos
#   SERVERS="lm llama-server" THREADS=2 PARALLEL=64 benchmarks/compare.sh
#   LM_ARGS="--quantization int8" SERVERS=lm benchmarks/compare.sh   # extra `lm serve api_server` options
#   LM_CONVERT_ARGS="--quantization int4" SERVERS=lm benchmarks/compare.sh   # extra `lm convert` options
#   LMCLI_CPU_ISA=avx2 LLAMA_SERVER=path/to/an/avx2/build/llama-server benchmarks/compare.sh  # both on AVX2 only
#   MODEL=gemma3-270m BACKEND=completions SERVERS="lm llama-server" benchmarks/compare.sh --dataset random \
#       --random-input-len 64 --random-output-len 128 --ignore-eos   # a base model: no chat template
#
# Arguments go to `lm bench serve` (after --num-prompts $NUM_PROMPTS --concurrency $PARALLEL
# --max-output-len $MAX_OUTPUT_LEN). The first run
# builds llama-server from the llama.cpp source vendored in the llama-cpp-python sdist (about 5 minutes on 2
# cores) and converts the GGUF into a Hugging Face folder for transformers; both are kept in $WORK.
set -euo pipefail
cd "$(dirname "$0")/.."

THREADS=${THREADS:-$(nproc)}        # compute threads for every server
PARALLEL=${PARALLEL:-64}            # concurrent requests, llama-server slots, lm's and transformers' batch
NUM_PROMPTS=${NUM_PROMPTS:-128}
MAX_OUTPUT_LEN=${MAX_OUTPUT_LEN:-256}  # ShareGPT answers longer than this are cut
SERVERS=${SERVERS:-"lm transformers llama-server"}
MODEL=${MODEL:-smollm2}             # a known model's name (lm convert --help lists them)
BACKEND=${BACKEND:-chat}            # lm bench serve --backend: chat, or completions for a base model
DTYPE=${DTYPE:-bfloat16}            # lm's and transformers' weights (llama-server runs the Q4_1 GGUF itself)
LM_ARGS=${LM_ARGS:-}                # more options for lm serve api_server, e.g. --quantization int8
LM_CONVERT_ARGS=${LM_CONVERT_ARGS:-}  # more options for lm convert, e.g. --quantization int4 (its own workspace)
PORT=${PORT:-23390}
WORK=${WORK:-$HOME/.cache/lmcli/compare}
OUT=${OUT:-benchmarks/results/$(date +%Y%m%d-%H%M%S)}
LLAMA_CPP_PYTHON=${LLAMA_CPP_PYTHON:-llama-cpp-python==0.3.36}
URL=http://127.0.0.1:$PORT
mkdir -p "$WORK" "$OUT"
export OMP_NUM_THREADS=$THREADS

GGUF=$(python -c "import sys; from lmcli.known_models import fetch; print(fetch(sys.argv[1]))" "$MODEL")
TAG=$([ "$MODEL" = smollm2 ] || echo "$MODEL-")  # the default model's folders keep their names
WORKSPACE=$WORK/workspace-$TAG$DTYPE$(echo "$LM_CONVERT_ARGS" | tr -c 'a-z0-9\n' -)
HF_DIR=$WORK/hf-$TAG$DTYPE
LLAMA_SERVER=${LLAMA_SERVER:-$WORK/llama.cpp/build/bin/llama-server}  # or another build (e.g. one for AVX2 only)

log() { echo "== $*" >&2; }

# shellcheck disable=SC2086  # LM_CONVERT_ARGS: words on purpose
[ -f "$WORKSPACE/lm_workspace.json" ] || lm convert "$GGUF" --dst-path "$WORKSPACE" --dtype "$DTYPE" --force $LM_CONVERT_ARGS

prepare_transformers() {
    [ -f "$HF_DIR/config.json" ] && return
    python -c "import fastapi, uvicorn, accelerate" 2>/dev/null || pip install -q "transformers[serving]"
    log "converting $GGUF into a Hugging Face folder ($HF_DIR)"
    python - "$GGUF" "$HF_DIR" "$DTYPE" <<'EOF'
import sys
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
gguf, dst, dtype = Path(sys.argv[1]), sys.argv[2], getattr(torch, sys.argv[3])
loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
config = loaded.config
config.__dict__.pop("quantization_config", None)  # dequantized already; transformers refuses to save "gguf"
model = AutoModelForCausalLM.from_config(config, dtype=dtype)
model.load_state_dict(loaded.state_dict())
model.save_pretrained(dst)
AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(dst)
EOF
}

prepare_llama_server() {
    [ -x "$LLAMA_SERVER" ] && return
    log "building llama-server from the $LLAMA_CPP_PYTHON sdist (about 5 minutes)"
    rm -rf "$WORK/sdist" && mkdir -p "$WORK/sdist"
    pip download -q --no-deps --no-binary :all: "$LLAMA_CPP_PYTHON" -d "$WORK/sdist"
    tar xzf "$WORK"/sdist/llama_cpp_python-*.tar.gz -C "$WORK/sdist"
    rm -rf "$WORK/llama.cpp" && mv "$WORK"/sdist/llama_cpp_python-*/vendor/llama.cpp "$WORK/llama.cpp"
    (cd "$WORK/llama.cpp" &&
        cmake -B build -DLLAMA_CURL=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF > /dev/null &&
        cmake --build build --target llama-server -j"$(nproc)" > /dev/null)
}

start() {  # start NAME: run the server in the background; its log goes to $OUT/NAME.log
    if curl -s --max-time 5 "$URL" > /dev/null; then log "port $PORT is taken"; return 1; fi
    case $1 in  # exec: $PID is the server itself, so that stop() stops it
    lm)
        # shellcheck disable=SC2086  # LM_ARGS: words on purpose
        exec lm serve api_server "$WORKSPACE" --server-port "$PORT" --max-batch-size "$PARALLEL" $LM_ARGS ;;
    transformers)
        exec transformers serve "$HF_DIR" --continuous-batching --device cpu --dtype "$DTYPE" --port "$PORT" ;;
    llama-server)
        # Every slot gets the ShareGPT filter's longest total, 2048 tokens; -cb: continuous batching.
        exec "$LLAMA_SERVER" -m "$GGUF" --port "$PORT" -t "$THREADS" -tb "$THREADS" -np "$PARALLEL" -cb \
            -c $((PARALLEL * 2048)) --jinja ;;
    esac > "$OUT/$1.log" 2>&1 &
    PID=$!
    for _ in $(seq 600); do
        curl -sf "$URL/health" > /dev/null && return
        kill -0 "$PID" 2>/dev/null || { log "$1 exited; see $OUT/$1.log"; return 1; }
        sleep 1
    done
    log "$1 did not become healthy in 10 minutes"; return 1
}

stop() { [ -n "${PID:-}" ] || return 0; kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; PID=; }
trap 'stop' EXIT

for name in $SERVERS; do
    case $name in
    transformers) prepare_transformers ;;
    llama-server) prepare_llama_server ;;
    lm) ;;
    *) log "unknown server $name (lm, transformers, llama-server)"; exit 2 ;;
    esac
done

for name in $SERVERS; do
    log "$name"
    start "$name"
    model=$(curl -s "$URL/v1/models" | python -c "import json, sys; print(json.load(sys.stdin)['data'][0]['id'])")
    # One short request first, so that no server pays its warm-up inside the measurement.
    lm bench serve "$URL" --model "$model" --tokenizer "$WORKSPACE" --backend "$BACKEND" --dataset random \
        --random-input-len 16 --random-output-len 4 --num-prompts 2 > /dev/null
    lm bench serve "$URL" --model "$model" --tokenizer "$WORKSPACE" --backend "$BACKEND" --num-prompts "$NUM_PROMPTS" \
        --concurrency "$PARALLEL" --max-output-len "$MAX_OUTPUT_LEN" --output "$OUT/$name.json" "$@"
    stop
done

lm bench compare $(for name in $SERVERS; do echo "$OUT/$name.json"; done)
