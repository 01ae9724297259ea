"""The causal language model (``model.task = causal-lm``): no head, evaluated by
perplexity.

Its parts: :mod:`common.tasks.causal_lm.model` (the model, its saved form and generation),
:mod:`common.tasks.causal_lm.data` (plain text and instruction rows) and
:mod:`common.tasks.causal_lm.bench` (the coordinator's model of a run).
"""

from common.tasks.causal_lm.task import CAUSAL_LM, CausalLM

__all__ = ["CAUSAL_LM", "CausalLM"]
