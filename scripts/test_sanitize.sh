#!/usr/bin/env bash
# Runs the GoogleTest suite and the C++ example built with AddressSanitizer, LeakSanitizer and
# UndefinedBehaviorSanitizer (make build-sanitize): any report fails. Usage:
#   scripts/test_sanitize.sh BUILD_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:?usage: test_sanitize.sh BUILD_DIR}
models="$build/test_models"
PYTHON=${PYTHON:-python3}

# The scripted models come from the (unsanitized) Python extension, as in ctest.
PYTHONPATH=python "$PYTHON" tests/cpp/make_models.py "$models" --no-aoti

supp="$PWD/tests/sanitize"
# halt_on_error/abort: the first report fails the run. Leaks are checked at exit (LSan);
# lsan.supp lists allocations that torch's libraries keep for the life of the process.
export ASAN_OPTIONS="detect_leaks=1:halt_on_error=1:strict_init_order=1:check_initialization_order=1:detect_stack_use_after_return=1"
export LSAN_OPTIONS="suppressions=$supp/lsan.supp:print_suppressions=0"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:suppressions=$supp/ubsan.supp"
export CNN_ATTENTION_TEST_MODELS="$models"

"$build/tests/cpp/cnn_attention_tests"
"$build/run_model" "$models/model.pt" "$models/input.pt" --expect "$models/output.pt"
echo "test-sanitize: clean (AddressSanitizer, LeakSanitizer, UndefinedBehaviorSanitizer)"
