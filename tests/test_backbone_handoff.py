"""The backbone hand-off: a site caches what the coordinator sends only when it is
exactly the backbone the coordinator named, and only inside its cache folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.backbone import (
    BackboneError,
    bundle_files,
    fingerprint,
    locate_on_site,
    store_bundle,
)


def test_an_intact_bundle_is_cached_under_its_fingerprint_and_found_there(
    tiny_backbone: Path, tmp_path: Path
) -> None:
    # Prepare
    expected = fingerprint(tiny_backbone)
    cache = tmp_path / "cache" / "backbones"

    # Execute
    stored = store_bundle(bundle_files(tiny_backbone), expected, cache)

    # Assert
    assert stored == cache / expected and fingerprint(stored) == expected
    assert locate_on_site(str(tiny_backbone), expected, tmp_path / "cache") == stored


def test_a_bundle_with_one_flipped_byte_is_refused_and_nothing_is_cached(
    tiny_backbone: Path, tmp_path: Path
) -> None:
    # Prepare: one bit of one weight file flipped in transit
    expected = fingerprint(tiny_backbone)
    files = bundle_files(tiny_backbone)
    weights = next(name for name in files if name.endswith(".safetensors"))
    tampered = files[weights].copy()
    tampered[len(tampered) // 2] ^= np.uint8(1)
    files[weights] = tampered
    cache = tmp_path / "cache" / "backbones"

    # Execute / Assert
    with pytest.raises(BackboneError, match="refusing to cache it"):
        store_bundle(files, expected, cache)
    assert list(cache.iterdir()) == []  # no staging folder or partial copy left


@pytest.mark.parametrize(
    "name", ["../outside.json", "sub/../../outside.json", "/tmp/absolute.json"]
)
def test_a_bundle_file_name_that_escapes_the_cache_folder_is_refused(
    name: str, tiny_backbone: Path, tmp_path: Path
) -> None:
    # Prepare
    files = {**bundle_files(tiny_backbone), name: np.frombuffer(b"{}", np.uint8)}
    cache = tmp_path / "cache" / "backbones"

    # Execute / Assert
    with pytest.raises(BackboneError, match="escapes the cache folder"):
        store_bundle(files, fingerprint(tiny_backbone), cache)
    assert list(cache.iterdir()) == []
    assert not (tmp_path / "cache" / "outside.json").exists()
