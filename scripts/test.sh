#!/usr/bin/env bash
# The test command: make the environment match requirements/lock.txt, then run the quick suite
# (CPU, under 5 minutes on an idle 2-core machine: every test not marked `slow`). `--all` as the
# first argument adds the slow set (subprocess runs of every verb and entry point; CI runs it).
# Other arguments go to pytest.
# When the installed packages already match the lock (and this checkout is the editable install)
# the install is skipped; otherwise the differences are printed and scripts/setup.sh brings the
# environment to the lock, so a reused machine tests the same set as a fresh one.
set -euo pipefail
cd "$(dirname "$0")/.."
select=(-m "not slow")
if [ "${1:-}" = "--all" ]; then
    select=()
    shift
fi
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
python -m pytest ${select[@]+"${select[@]}"} ${where[@]+"${where[@]}"} "$@"
