#!/usr/bin/env bash
# Install the CPU build of torch into the given python's environment, never a CUDA build.
# Usage: tools/install_torch_cpu.sh PYTHON
set -euo pipefail
py="${1:-python3}"
if "$py" -c "import torch" 2>/dev/null; then exit 0; fi
if ls /opt/wheels/torch-2.13.0+cpu-*.whl >/dev/null 2>&1; then
  "$py" -m pip install -q torch==2.13.0            # the CPU wheel that lies on this machine's disk
else
  "$py" -m pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
fi
"$py" -c "import torch; assert not torch.version.cuda, 'a CUDA torch was installed: ' + torch.__version__"
