import pytest


@pytest.fixture(autouse=True)
def _media_in_tmp(settings, tmp_path):
    """Version blobs go to a temporary directory, not the checkout's var/."""
    settings.MEDIA_ROOT = str(tmp_path / "media")
