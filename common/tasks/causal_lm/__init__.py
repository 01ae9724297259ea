"""The causal language model (``model.task = causal-lm``): no head, evaluated by
perplexity.

Its parts: :mod:`common.causal_lm` (the model, its saved form and generation),
:mod:`common.lm_data` (plain text and instruction rows) and
:mod:`common.causal_lm_bench` (the coordinator's model of a run).
"""

from common.tasks.causal_lm.task import CAUSAL_LM, CausalLM

__all__ = ["CAUSAL_LM", "CausalLM"]
