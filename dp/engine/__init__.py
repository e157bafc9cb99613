"""Batched DP-SGD engine: ghost norms + book-keeping from one forward and one backward pass.

See :class:`DPSGDEngine`.
"""

from .engine import DPSGDEngine, GradientEscapeError, UnsupportedModuleError
from .rules import Rule, register_rule

__all__ = ["DPSGDEngine", "GradientEscapeError", "UnsupportedModuleError", "Rule", "register_rule"]
