#!/usr/bin/env bash
# The test command: make the environment match requirements/lock.txt, then run the whole suite
# (CPU, well under 10 minutes). Extra arguments go to pytest.
# When the installed packages already match the lock (and this checkout is the editable install)
# the install is skipped; otherwise the differences are printed and scripts/setup.sh brings the
# environment to the lock, so a reused machine tests the same set as a fresh one.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python scripts/check_lock.py --quiet; then
    echo "test.sh: installing the locked versions (scripts/setup.sh)"
    bash scripts/setup.sh
    if ! python scripts/check_lock.py; then
        echo "test.sh: the environment still differs from the lock after setup.sh" >&2
        exit 1
    fi
fi
echo "test.sh: testing against the lock: $(python scripts/check_lock.py --summary)"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# The whole suite, unless the arguments name test files or nodes themselves
# (`bash scripts/test.sh -x -q tests/test_lock.py` runs just that file).
where=(tests)
for a in "$@"; do
    if [ -e "${a%%::*}" ]; then where=(); break; fi
done
python -m pytest ${where[@]+"${where[@]}"} "$@"
