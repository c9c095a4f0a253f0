#!/usr/bin/env bash
# Render a sample report.html (tiny two-round card, plots, a heatmap) and screenshot it in a headless
# browser, to check by eye that the self-contained dashboard is readable. Not part of the test suite
# (which needs no browser); run it after changing optipfair_train/pipeline/report.py.
#
#   apt-get update && apt-get install -y chromium     # Debian package, once
#   bash scripts/check_report.sh [REPORT.html]        # default: a sample report; writes /tmp/report.png
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

from matplotlib.figure import Figure
from test_report import _two_rounds

from optipfair_train.pipeline.report import write_report

fig = Figure(figsize=(4, 3))
ax = fig.subplots()
image = ax.imshow([[0.1, 0.5, 0.2], [0.3, 0.9, 0.4]], cmap="viridis")
fig.colorbar(image)
ax.set_title("sample heatmap")
print(write_report(Path(sys.argv[1]), _two_rounds(), figures={"sample bias heatmap": fig}))
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
"$BROWSER" --headless --no-sandbox --disable-gpu --screenshot=/tmp/report.png --window-size=1200,1600 \
  "file://$(realpath "$REPORT")" 2>/dev/null
echo "Screenshot of $REPORT: /tmp/report.png"
