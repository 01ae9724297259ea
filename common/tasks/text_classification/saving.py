"""The text classifier's saved forms in a run's output folder: ``adapter/`` (PEFT
format, with the head, pooling mode and label map) and ``merged/`` (the backbone
with the adapter merged in, loadable by ``AutoModel`` and sentence-transformers)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from common.backbone import write_pooling_mode
from common.outputs import ADAPTER_DIR, MERGED_DIR, RunOutputs
from common.tasks.text_classification.model import TextClassifier, save_head

# sentence-transformers files that make ``merged/`` loadable by that library too.
_SENTENCE_TRANSFORMERS_FILES = (
    "config_sentence_transformers.json",
    "sentence_bert_config.json",
)


def write_sentence_modules(backbone_dir: Path, staging: Path) -> None:
    """The backbone's sentence-transformers modules up to its pooling, with their
    folders: the features the head was trained on.

    Later modules (all-MiniLM-L6-v2's ``2_Normalize``) are left out: the head reads
    the pooled features unnormalised, so a sentence-transformers user of ``merged/``
    gets those same features.
    """
    modules = json.loads((backbone_dir / "modules.json").read_text())
    kept = []
    for module in modules:
        kept.append(module)
        if module.get("path") and (backbone_dir / module["path"]).is_dir():
            shutil.copytree(backbone_dir / module["path"], staging / module["path"])
        if module.get("type", "").endswith("Pooling"):
            break
    (staging / "modules.json").write_text(json.dumps(kept, indent=2) + "\n")


def save_adapter(
    outputs: RunOutputs, model: TextClassifier, labels: tuple[str, ...]
) -> Path:
    """PEFT-format adapter (``PeftModel.from_pretrained(backbone, dir)`` loads it)
    with the head, pooling mode and label map beside it."""

    def write(staging: Path) -> None:
        model.encoder.save_pretrained(str(staging))
        save_head(model, staging, labels)

    return outputs.write_folder(ADAPTER_DIR, write)


def save_merged(
    outputs: RunOutputs,
    model: TextClassifier,
    tokenizer: PreTrainedTokenizerBase,
    labels: tuple[str, ...],
    backbone_dir: Path,
) -> Path:
    """The backbone with the adapter merged in (``AutoModel`` loads it), the head,
    the pooling config, the tokenizer and the label map."""

    def write(staging: Path) -> None:
        merged = copy.deepcopy(model.encoder).merge_and_unload()
        merged.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        save_head(model, staging, labels)
        for name in _SENTENCE_TRANSFORMERS_FILES:
            if (backbone_dir / name).exists():
                shutil.copy2(backbone_dir / name, staging / name)
        if (backbone_dir / "modules.json").exists():
            write_sentence_modules(backbone_dir, staging)
        write_pooling_mode(staging, model.pooling)

    return outputs.write_folder(MERGED_DIR, write)
