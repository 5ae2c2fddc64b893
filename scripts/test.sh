#!/usr/bin/env bash
# Set up .venv with the test extras and run the whole test suite. Extra arguments go to pytest.
# The tests run in parallel on the usable cores, up to 4 (pytest-xdist; ITAE_TEST_WORKERS=N
# chooses N, 0 or 1 runs them in this one process).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh --test
cores=$(.venv/bin/python -c "import os; print(len(os.sched_getaffinity(0)))")
workers=${ITAE_TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}
case "$workers" in
  ''|*[!0-9]*) echo "error: ITAE_TEST_WORKERS=$workers is not a number of workers" >&2; exit 2 ;;
esac
parallel=()
[ "$workers" -gt 1 ] && parallel=(-n "$workers")
set +e
.venv/bin/python -m pytest -q -p no:cacheprovider "${parallel[@]}" "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
