#!/usr/bin/env bash
# Installs everything the build, the tests, the demo and the benchmarks need on a fresh Debian
# machine, in or outside a virtual environment. Idempotent: each step is skipped when its result
# is already there.
set -euo pipefail
PYTHON=${PYTHON:-python3}
requirements="$(dirname "$0")/../requirements-dev.txt"

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

# Every line of requirements-dev.txt must be installed at a version it accepts (name, or
# name==V, or name>=V); the first one missing sends the whole file to pip.
if ! "$PYTHON" - "$requirements" <<'PY'
import importlib.metadata as md
import re
import sys


def release(version):
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


missing = []
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if not line:
        continue
    name, op, wanted = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*(?:(==|>=)\s*(\S+))?", line).groups()
    try:
        have = md.version(name)
    except md.PackageNotFoundError:
        missing.append(f"{name} (not installed)")
        continue
    if op == "==" and release(have) != release(wanted) or op == ">=" and release(have) < release(wanted):
        missing.append(f"{name} {have} (wanted {op}{wanted})")
if missing:
    print("setup: missing " + ", ".join(missing))
    sys.exit(1)
PY
then
  echo "setup: pip install -r requirements-dev.txt"
  "$PYTHON" -m pip install -q -r "$requirements"
fi
