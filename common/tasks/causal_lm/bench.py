"""The whole causal language model of a run, for the coordinator: the seeded initial
adapter, perplexity on the held-out rows, and the exported ``adapter/`` and
``merged/`` folders."""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from common.backbone import coordinator_backbone_dir, fingerprint, name_adapter_base
from common.codec import AdapterState
from common.config import RunConfig
from common.data import Example
from common.evaluation import EvalResult
from common.outputs import ADAPTER_DIR, MERGED_DIR, RunOutputs
from common.tasks.causal_lm.data import LmEncoded, encode_lm
from common.tasks.causal_lm.model import (
    CausalLanguageModel,
    evaluate_lm,
    lm_adapter_state,
    load_causal_lm,
    load_lm_adapter_state,
    load_lm_tokenizer,
    save_lm_adapter,
    save_merged_lm,
)
from common.tasks.finish import backbone_facts

log = logging.getLogger(__name__)

#: What a causal LM's instructions say about pooling: it pools nothing.
NO_POOLING = "none"


@dataclass
class CausalLMWorkbench:
    """Backbone with adapters, tokenizer and evaluation rows of a ``causal-lm`` run.

    Build it with :meth:`open`.
    """

    config: RunConfig
    backbone_dir: Path
    fingerprint: str
    model: CausalLanguageModel
    tokenizer: PreTrainedTokenizerBase
    pad_id: int
    test: LmEncoded
    pooling: str = NO_POOLING
    labels: tuple[str, ...] = ()

    @classmethod
    def open(
        cls, config: RunConfig, labels: tuple[str, ...], test_examples: list[Example]
    ) -> CausalLMWorkbench:
        """Load the backbone named by ``model.name`` with the seeded adapter and
        tokenise the evaluation rows.

        Raises
        ------
        common.backbone.BackboneError
            When the backbone cannot be found.
        ValueError
            When ``labels`` is not empty (a language model has no label map).
        """
        if labels:
            raise ValueError("a causal language model run has no label map")
        backbone_dir = coordinator_backbone_dir(config.model.name)
        model = load_causal_lm(backbone_dir, config.lora, config.seed)
        tokenizer, pad_id = load_lm_tokenizer(backbone_dir)
        bench = cls(
            config,
            backbone_dir,
            fingerprint(backbone_dir),
            model,
            tokenizer,
            pad_id,
            encode_lm(
                tokenizer,
                test_examples,
                config.data.prompt_column,
                config.model.max_length,
            ),
        )
        log.info(
            "causal LM %s (%s): %d trainable parameters, %d test rows, %d test "
            "tokens with loss",
            config.model.name,
            bench.fingerprint[:12],
            sum(p.numel() for p in model.parameters() if p.requires_grad),
            len(bench.test),
            bench.test.target_tokens(),
        )
        return bench

    def state(self) -> AdapterState:
        """The current LoRA factors."""
        return lm_adapter_state(self.model)

    def evaluate(
        self,
        state: AdapterState | None = None,
        labels: Collection[int] | None = None,
    ) -> EvalResult:
        """Per-token loss, next-token accuracy and perplexity of ``state`` (or the
        current adapter) on the evaluation rows.

        Raises
        ------
        ValueError
            When ``labels`` is given: a language model's rows have no labels.
        """
        if labels is not None:
            raise ValueError(
                "a causal language model has no labels to evaluate a subset of"
            )
        if state is not None:
            load_lm_adapter_state(self.model, state)
        return evaluate_lm(self.model, self.test, self.pad_id)

    def encode_examples(self, examples: list[Example]) -> LmEncoded:
        """Tokenise rows as the clients do."""
        return encode_lm(
            self.tokenizer,
            examples,
            self.config.data.prompt_column,
            self.config.model.max_length,
        )

    def export(self, outputs: RunOutputs, state: AdapterState) -> None:
        """Write ``adapter/`` (PEFT format) and ``merged/`` (a causal LM folder that
        ``fedgraft generate`` and ``AutoModelForCausalLM`` load) for ``state``."""
        load_lm_adapter_state(self.model, state)
        adapter = outputs.write_folder(
            ADAPTER_DIR, lambda path: save_lm_adapter(self.model, path)
        )
        name_adapter_base(adapter, self.config.model.name)
        outputs.write_folder(
            MERGED_DIR, lambda path: save_merged_lm(self.model, self.tokenizer, path)
        )

    def backbone_facts(self) -> dict[str, object]:
        """Name, fingerprint and sizes for ``summary.json``."""
        return backbone_facts(self, self.model)

