#!/usr/bin/env bash
# ctest driver for the transformers checks (interop_hf.py, families_hf.py, chat_hf.py). Needs Debian's python3-torch (1.13)
# and, in a venv that sees it, transformers + safetensors from PyPI (4.46.x: the last to run on torch 1.13,
# and it knows Llama 3.x rope scaling, Mistral, Qwen2 and Gemma). Exits 77 (ctest SKIP_RETURN_CODE) only when
# PyPI is unreachable.
# usage: run_interop.sh VENV_DIR BTX_MODEL_TOOL BTX_TRAIN WORKDIR [SCRIPT (default interop_hf.py)]
set -eu
venv=$1 tool=$2 train=$3 work=$4 script=${5:-interop_hf.py}
transformers_version=4.46.3
here=$(cd "$(dirname "$0")" && pwd)
if ! /usr/bin/python3 -c 'import torch' 2>/dev/null; then
  echo "interop: /usr/bin/python3 has no torch; install it with: apt-get install -y python3-torch" >&2
  exit 1
fi
if [ ! -x "$venv/bin/python" ]; then
  /usr/bin/python3 -m venv --system-site-packages "$venv"
fi
# jinja2: apply_chat_template (chat_hf.py) renders chat templates with it.
if ! "$venv/bin/python" -c "import transformers, safetensors, jinja2; assert transformers.__version__ == '$transformers_version'" 2>/dev/null; then
  if ! "$venv/bin/pip" install -q --disable-pip-version-check "transformers==$transformers_version" "safetensors>=0.4,<0.5" "jinja2>=3.1,<3.2"; then
    if ! "$venv/bin/python" - <<'PY' 2>/dev/null
import urllib.request
urllib.request.urlopen("https://pypi.org/simple/", timeout=10)
PY
    then
      echo "interop: SKIPPED: PyPI is unreachable, cannot install transformers/safetensors" >&2
      exit 77
    fi
    echo "interop: pip install failed although PyPI is reachable" >&2
    exit 1
  fi
fi
rm -rf "$work"
exec "$venv/bin/python" "$here/$script" --tool "$tool" --train "$train" --workdir "$work"
