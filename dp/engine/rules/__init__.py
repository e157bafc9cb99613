"""Per-layer rules of the batched DP-SGD engine.

A *rule* knows, for one module type, how to turn what was captured during one
forward pass (the module's input activation) and one backward pass (the
gradient of the loss sum with respect to the module's output) into

* the squared per-example gradient norm of the module's trainable parameters
  (ghost norm, sparse row sums or small instantiation, whichever is cheaper),
* the clipped sum ``sum_i c_i * grad_i`` of those parameters (book-keeping,
  Bu et al. 2023, "Differentially private optimization on large model at small
  cost", ICML 2023, Algorithm 1), formed from the same captured tensors,
* the per-example gradients themselves (only used for parameters that are
  used more than once in a forward pass, e.g. tied weights).

Rules register themselves with :func:`register_rule`; :func:`rule_for` finds the
rule for a module by walking its class' MRO.
"""

from __future__ import annotations

from typing import Callable, Dict, Type

import torch.nn as nn

from .base import Capture, Rule

_RULES: Dict[Type[nn.Module], Rule] = {}


def register_rule(*module_types: Type[nn.Module]) -> Callable[[type], type]:
    """Class decorator registering a :class:`Rule` subclass for module types.

    Parameters
    ----------
    *module_types : type
        ``nn.Module`` subclasses the rule handles (subclasses of these are
        handled too, unless a more specific rule is registered).

    Returns
    -------
    Callable
        The decorator; it instantiates the rule class once and returns the class.
    """

    def deco(cls: type) -> type:
        inst = cls()
        for t in module_types:
            _RULES[t] = inst
        return cls

    return deco


def rule_for(module: nn.Module) -> Rule | None:
    """Return the rule registered for ``type(module)`` (nearest in the MRO), or None."""
    for klass in type(module).__mro__:
        if klass in _RULES:
            return _RULES[klass]
    return None


def registered_types() -> tuple:
    """Module types that have a rule, for error messages."""
    return tuple(_RULES)


# Import the rule modules so that they register themselves.
from . import embedding, layernorm, linear  # noqa: E402,F401

__all__ = ["Capture", "Rule", "register_rule", "rule_for", "registered_types"]
