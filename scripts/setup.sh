#!/usr/bin/env bash
# Installs everything GRAPE needs into the current Python environment, at the versions in
# requirements/lock.txt. Idempotent: a second run changes nothing.
# torch goes first and pinned to the lock's version: the CPU build lies on disk here, and an
# unpinned torch (or one resolved together with the rest) can pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
LOCK=requirements/lock.txt
TORCH=$(sed -n 's/^torch==\([^[:space:]#]*\).*/\1/p' "$LOCK")
if [ -z "$TORCH" ]; then
    echo "setup.sh: no torch==VERSION line in $LOCK" >&2
    exit 2
fi
have=$(python -c "import importlib.metadata as m; print(m.version('torch'))" 2>/dev/null || true)
if [ "${have%%+*}" != "$TORCH" ]; then
    pip install --quiet "torch==$TORCH"
fi
pip install --quiet -c "$LOCK" -e ".[test]"
