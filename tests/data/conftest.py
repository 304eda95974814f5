import pytest


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder of the test's own whose permission bits forbid writing (restored afterwards)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    yield folder
    folder.chmod(0o755)
