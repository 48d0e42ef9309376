#!/usr/bin/env bash
# Would newer dependency releases break GRAPE? Tests them in a throwaway virtual environment.
#
#   bash scripts/upgrade-check.sh [--venv DIR] [--package NAME]... [--torch VERSION]
#                                 [--write-lock] [--keep] [-- PYTEST_ARGS...]
#
# 1. makes a fresh venv (in a temp dir, removed at the end unless --keep; or DIR, kept);
# 2. installs torch at the lock's version (or --torch VERSION; it must be a CPU build pip can
#    find, as on this machine's disk) and holds it there;
# 3. installs the project's dependencies (pyproject `dependencies` + the [test] extra) WITHOUT
#    requirements/lock.txt and with pyproject's upper bounds (<, <=) removed, so pip picks the
#    newest releases; each --package NAME (default: transformers lm_eval cvxpy ortools accelerate
#    numpy) is required at the newest version `pip index versions` reports, so a resolver
#    conflict shows up as a failure instead of a silently older release; then the project
#    itself with --no-deps;
# 4. runs the test suite there (tests/test_lock.py's check that the environment equals the lock
#    is deselected: here it differs on purpose) and prints which versions differ from the lock
#    plus pytest's result;
# 5. with --write-lock, and only when the suite passed, rewrites requirements/lock.txt from that
#    venv's `pip freeze`. Raise pyproject's upper bounds to admit the new pins (tests/test_lock.py
#    checks that every pin satisfies them), run scripts/test.sh, and commit both.
# Exit status: pytest's (non-zero also when the install fails).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
LOCK=$ROOT/requirements/lock.txt
VENV= KEEP=0 WRITE=0 TORCH= PACKAGES=() PYTEST_ARGS=()
while [ $# -gt 0 ]; do
    case $1 in
        --venv) VENV=$2; KEEP=1; shift 2 ;;
        --package) PACKAGES+=("$2"); shift 2 ;;
        --torch) TORCH=$2; shift 2 ;;
        --write-lock) WRITE=1; shift ;;
        --keep) KEEP=1; shift ;;
        --) shift; PYTEST_ARGS=("$@"); break ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "upgrade-check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
[ ${#PACKAGES[@]} -gt 0 ] || PACKAGES=(transformers lm_eval cvxpy ortools accelerate numpy)
[ -n "$TORCH" ] || TORCH=$(sed -n 's/^torch==\([^[:space:]#]*\).*/\1/p' "$LOCK")
if [ -z "$VENV" ]; then
    VENV=$(mktemp -d /tmp/grape-upgrade.XXXXXX)/venv
fi
cleanup() { if [ "$KEEP" = 0 ]; then rm -rf "$(dirname "$VENV")"; fi; }
trap cleanup EXIT
WORK=$(dirname "$VENV")
echo "upgrade-check: venv $VENV (torch $TORCH; newest: ${PACKAGES[*]})"
python -m venv "$VENV"
PY=$VENV/bin/python
PIP=("$PY" -m pip --quiet)

"${PIP[@]}" install "torch==$TORCH"
echo "torch==$TORCH" > "$WORK/torch-pin.txt"

# The direct requirements without upper bounds, plus NAME==newest for each --package.
"$PY" - "$ROOT/pyproject.toml" > "$WORK/unbounded.txt" <<'EOF'
import re, sys
try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
for req in project["dependencies"] + project["optional-dependencies"]["test"]:
    m = re.match(r"\s*([A-Za-z0-9._-]+(?:\[[^\]]*\])?)\s*(.*)", req)
    kept = [s.strip() for s in m.group(2).split(",") if s.strip() and not s.strip().startswith("<")]
    print(m.group(1) + ",".join(kept))
EOF
for p in "${PACKAGES[@]}"; do
    newest=$("$PY" -m pip index versions "$p" 2>/dev/null | sed -n '1s/^[^(]*(\([^)]*\)).*/\1/p')
    if [ -z "$newest" ]; then
        echo "upgrade-check: no versions found for $p" >&2
        exit 2
    fi
    locked=$("$PY" -c "import sys; sys.path.insert(0, 'scripts'); import check_lock as c
print(c.read_lock(c.DEFAULT_LOCK).get(c.normalize('$p'), ''))")
    echo "  $p: newest $newest, locked ${locked:-(not locked)}"
    echo "$p==$newest" >> "$WORK/unbounded.txt"
done
"${PIP[@]}" install -c "$WORK/torch-pin.txt" -r "$WORK/unbounded.txt"
"${PIP[@]}" install --no-deps -e "$ROOT"
"$PY" -m pip freeze --exclude-editable > "$WORK/freeze.txt"
# pip check also reports pyproject upper bounds that the new releases exceed: shown, not fatal.
"$PY" -m pip check || true

echo "upgrade-check: versions that differ from requirements/lock.txt:"
"$PY" - "$LOCK" "$WORK/freeze.txt" <<'EOF'
import sys
sys.path.insert(0, "scripts")
from check_lock import PIN, normalize, read_lock, same_version
lock = read_lock(__import__("pathlib").Path(sys.argv[1]))
new = {}
for line in open(sys.argv[2]):
    m = PIN.match(line.strip())
    if m:
        new[normalize(m.group(1))] = m.group(2)
rows = [f"  {n}: {lock[n]} -> {new[n]}" for n in sorted(lock.keys() & new.keys())
        if not same_version(lock[n], new[n])]
rows += [f"  {n}: {lock[n]} -> (gone)" for n in sorted(lock.keys() - new.keys())]
rows += [f"  {n}: (new) {new[n]}" for n in sorted(new.keys() - lock.keys())]
print("\n".join(rows) if rows else "  none: the newest allowed releases are the locked ones")
EOF

echo "upgrade-check: running the test suite in $VENV"
where=(tests)  # the whole suite, unless PYTEST_ARGS name test files or nodes themselves
for a in ${PYTEST_ARGS[@]+"${PYTEST_ARGS[@]}"}; do
    if [ -e "${a%%::*}" ]; then where=(); break; fi
done
set +e
HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
    "$PY" -m pytest ${where[@]+"${where[@]}"} -p no:cacheprovider \
    --deselect tests/test_lock.py::test_installed_environment_matches_the_lock \
    ${PYTEST_ARGS[@]+"${PYTEST_ARGS[@]}"} 2>&1 | tee "$WORK/pytest.log"
rc=${PIPESTATUS[0]}
set -e
result=$(grep -E '[0-9]+ (passed|failed|errors?|deselected)|no tests ran' "$WORK/pytest.log" | tail -1 | tr -d '=' | sed 's/^ *//')
echo "upgrade-check: pytest exit $rc: ${result:-(no summary line; see above)}"
if [ "$WRITE" = 1 ]; then
    if [ "$rc" = 0 ]; then
        "$PY" scripts/check_lock.py --write-lock "$WORK/freeze.txt" "$LOCK"
    else
        echo "upgrade-check: suite failed; requirements/lock.txt left as it was" >&2
    fi
fi
exit "$rc"
