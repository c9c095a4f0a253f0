#!/usr/bin/env bash
# Render a sample report.html (tiny two-round card, plots, a heatmap) and screenshot it in a headless
# browser, to check by eye that the self-contained dashboard is readable. Not part of the test suite
# (which needs no browser); run it after changing optipfair_train/pipeline/report.py.
#
#   apt-get update && apt-get install -y chromium     # Debian package, once
#   bash scripts/check_report.sh [REPORT.html]        # default: a sample report; writes /tmp/report.png
#   HEIGHT=6000 bash scripts/check_report.sh            # a taller screenshot (the whole page)
#
# A real run's report works too: bash scripts/check_report.sh outputs/demo/final/report.html
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
REPORT="${1:-}"
if [ -z "$REPORT" ]; then
  OUT="$(mktemp -d)"
  PYTHONPATH="$PWD:$PWD/tests" "$PYTHON" - "$OUT" <<'PY'
import sys
from pathlib import Path

from test_figure_content import _state
from test_report import _two_rounds

from optipfair_train.pipeline.figures import report_figures
from optipfair_train.pipeline.report import write_report

card = _two_rounds()  # two rounds with their healing losses, every figure the pipeline draws
card["rounds"][0]["heal_loss"] = [[1, 3.2], [2, 2.9], [3, 2.7]]
card["rounds"][1]["heal_loss"] = [[1, 3.0], [2, 2.8], [3, 2.6]]
files = {"final model": "outputs/demo/final", "report": "outputs/demo/report.html"}
print(write_report(Path(sys.argv[1]), card, figures=report_figures(_state()), files=files))
PY
  REPORT="$OUT/report.html"
fi
if grep -Eq 'https?://' "$REPORT"; then
  echo "FAIL: $REPORT references an external URL" >&2
  exit 1
fi
BROWSER="$(command -v chromium || command -v chromium-browser || true)"
if [ -z "$BROWSER" ]; then
  echo "No chromium found; install it with: apt-get update && apt-get install -y chromium" >&2
  exit 2
fi
"$BROWSER" --headless --no-sandbox --disable-gpu --screenshot=/tmp/report.png --window-size=1200,${HEIGHT:-1600} \
  "file://$(realpath "$REPORT")" 2>/dev/null
echo "Screenshot of $REPORT: /tmp/report.png"
