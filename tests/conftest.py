import os
from pathlib import Path

# The suite tests the Triton kernels through Triton's interpreter, on CPU tensors (GPU checks are
# scripts/check_ops_gpu.py). Triton decorates its own library functions when it is first imported,
# so the interpreter has to be chosen before anything imports triton, i.e. here.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

SHARED_DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """The small real data sets kept beside the repository (never copied into it)."""
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"real data sets not found at {SHARED_DATASETS} (the shared folder beside the repository)")
    return SHARED_DATASETS


@pytest.fixture(autouse=True, scope="session")
def private_cache_dir(tmp_path_factory):
    """Parse caches of read-only sources go to a folder of the test run, not the user's home."""
    import os

    previous = os.environ.get("XMLSPARSE_CACHE_DIR")
    os.environ["XMLSPARSE_CACHE_DIR"] = str(tmp_path_factory.mktemp("xmlsparse-cache"))
    yield
    if previous is None:
        os.environ.pop("XMLSPARSE_CACHE_DIR", None)
    else:
        os.environ["XMLSPARSE_CACHE_DIR"] = previous
