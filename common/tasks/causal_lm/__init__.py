"""The causal language model (``model.task = causal-lm``): no head, evaluated by
perplexity.

Its parts, as modules of this package: ``model`` (the model, its saved form and
generation), ``data`` (plain text and instruction rows), ``bench`` (the
coordinator's model of a run), ``checks`` (its config rules), ``export`` (its ONNX
plan), ``task`` (its Task).
"""

from common.tasks.causal_lm.task import CAUSAL_LM, CausalLM

__all__ = ["CAUSAL_LM", "CausalLM"]
