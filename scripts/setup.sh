#!/usr/bin/env bash
# Installs everything the build and the tests need on a fresh Debian machine. Idempotent:
# each step is skipped when its result is already there.
set -euo pipefail
PYTHON=${PYTHON:-python3}

need_apt=()
command -v ccache >/dev/null || need_apt+=(ccache)
command -v ninja >/dev/null || need_apt+=(ninja-build)
[ -f /usr/src/googletest/CMakeLists.txt ] || need_apt+=(libgtest-dev)
command -v g++ >/dev/null || need_apt+=(g++)
if ((${#need_apt[@]})); then
  echo "setup: apt-get install ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}"
fi

if ! "$PYTHON" - <<'PY' 2>/dev/null
import importlib.metadata as md, sys
want = {"torch": "2.15.0"}
for pkg in ["torch", "numpy", "ninja", "cmake", "pytest", "tqdm"]:
    version = md.version(pkg)
    if pkg in want and version.split("+")[0] != want[pkg]:
        sys.exit(1)
PY
then
  echo "setup: pip install -r requirements-dev.txt"
  "$PYTHON" -m pip install -q -r "$(dirname "$0")/../requirements-dev.txt"
fi
