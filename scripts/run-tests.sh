#!/usr/bin/env bash
# Run the test suite. As root, inside a fresh network namespace that has only loopback, so
# that no test can reach anything but 127.0.0.0/8 and ::1 (set MAILWARDEN_NO_NETNS=1 to run
# in the host namespace). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
# Two test processes by default (one per core); MAILWARDEN_TEST_WORKERS=0 runs serially.
export MAILWARDEN_REQUIRE_COMPONENTS=${MAILWARDEN_REQUIRE_COMPONENTS:-1}
WORKERS=${MAILWARDEN_TEST_WORKERS:-2}
XDIST=()
[ "$WORKERS" != "0" ] && XDIST=(-n "$WORKERS")
PYTEST=(.venv/bin/python -m pytest -p no:cacheprovider "${XDIST[@]}" "$@")
if [ "${MAILWARDEN_NO_NETNS:-0}" != "1" ] && [ "$(id -u)" = 0 ] \
   && unshare --net true 2>/dev/null; then
  echo "run-tests: inside a loopback-only network namespace"
  exec unshare --net -- bash -c 'ip link set lo up && exec "$@"' run-tests "${PYTEST[@]}"
fi
echo "run-tests: in the host network namespace (tests still only use loopback)"
exec "${PYTEST[@]}"
