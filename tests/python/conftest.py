import hashlib
import os
import sys
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, settings

# Tests import the package from the source tree (built in place by `make build`).
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "python"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# The operator table (tests/shared/operators.py), shared with the fuzzer and the sanitizer workload.
sys.path.insert(0, os.path.join(ROOT, "tests", "shared"))

import cnn_attention  # noqa: E402,F401


# torch.compile's on-disk caches (inductor's FX graph and AOTAutograd caches) key a compiled
# graph by the ops it was traced to, not by the code behind them: a cache written with another
# build of the library would replay its calls of our private operators, whose schemas may
# differ. The tests keep one cache per build of the library (set before anything compiles).
def _library_digest() -> str:
    library = os.path.join(os.path.dirname(cnn_attention.__file__), "libcnn_attention.so.0")
    with open(library, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()[:16]


os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"torchinductor_cnn_attention_{_library_digest()}"))

# Hypothesis profiles of test_properties.py. "default" (make test): a bounded number of examples
# per property, derandomized so that CI runs the same examples every time. "fuzz"
# (--hypothesis-profile=fuzz): 10,000 fresh random examples per property. Examples take up to
# a fraction of a second and draw large tensors' shapes, hence no deadline and no too_slow or
# data_too_large checks; the autouse _seed fixture is harmless (every example seeds torch from
# its own drawn seed). No example database: .hypothesis/ is not ignored by git, and a failure
# prints its case and a @reproduce_failure blob instead.
settings.register_profile(
    "default",
    max_examples=60,
    deadline=None,
    derandomize=True,
    print_blob=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
settings.register_profile("fuzz", settings.get_profile("default"), max_examples=10_000, derandomize=False)

# cuBLAS is deterministic only with a fixed workspace: torch.use_deterministic_algorithms(True)
# refuses CUDA matrix products without it (test_determinism.py). Set before CUDA starts.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

HAS_CUDA = torch.cuda.is_available() and cnn_attention.build_info()["cuda"] is not None

# The eager compositions the tests compare against (timm's and torchvision's blocks, the
# modules' own convolutions) run their float32 convolutions in full float32 on CUDA: cuDNN's
# default TF32 mode rounds their inputs to 10-bit mantissas, errors of 1e-3 that no float32
# tolerance admits. Tests that need TF32 on (the operators must not depend on it) turn it on
# themselves.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device and a CUDA build of cnn_attention")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
