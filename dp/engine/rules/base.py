"""Rule interface and the record of one module call."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Sequence, Tuple

import torch
import torch.nn as nn


@dataclass
class Capture:
    """What the engine keeps of one call of one module during a forward pass.

    Attributes
    ----------
    module : nn.Module
        The module that was called.
    activation : Any
        What the rule needs from the input (e.g. the input tensor ``A`` of shape
        ``[B, ..., d_in]`` for Linear, the token ids ``[B, ...]`` for Embedding).
    output : torch.Tensor
        The module output the engine differentiates against, ``[B, ..., d_out]``.
    batch_size : int
        ``B``, the size of the leading (example) dimension of ``output``.
    version : int
        ``output._version`` at capture time; an in-place change of the output
        before the backward pass is detected and reported.
    """

    module: nn.Module
    activation: Any
    output: torch.Tensor
    batch_size: int
    version: int = 0
    extra: Dict[str, Any] = field(default_factory=dict)


class Rule:
    """Base class of a per-layer rule (see :mod:`dp.engine.rules`).

    All tensors are batched over the example dimension ``B``; no method loops
    over examples.
    """

    def check(self, module: nn.Module) -> None:
        """Raise ``ValueError`` if the module's configuration is unsupported."""

    def capture(
        self, module: nn.Module, inputs: Tuple[Any, ...], output: torch.Tensor, batch_size: int | None
    ) -> Tuple[Any, torch.Tensor | None]:
        """Return ``(activation, replaced_output_or_None)`` for one module call.

        ``batch_size`` is the batch size of the current forward pass when the
        engine knows it (from the root module's inputs), else None.
        """
        raise NotImplementedError

    def norm_sq(
        self,
        cap: Capture,
        grad_out: torch.Tensor,
        names: Sequence[str],
        cache: Dict[Any, torch.Tensor],
    ) -> Tuple[torch.Tensor, Any]:
        """Squared per-example gradient norm over the parameters ``names``.

        Parameters
        ----------
        cap : Capture
            The module call.
        grad_out : Tensor, shape ``[B, ..., d_out]``
            Gradient of ``sum_i loss_i`` with respect to ``cap.output``; row ``i``
            is example ``i``'s output gradient.
        names : sequence of str
            Names (as in ``module.named_parameters(recurse=False)``) of the
            parameters to include.
        cache : dict
            Per-step cache shared by all rules (e.g. activation grams shared by
            the query, key and value projections that read the same input).

        Returns
        -------
        (Tensor ``[B]``, state)
            The squared norms, and a state passed on to :meth:`add_clipped`.
        """
        raise NotImplementedError

    def add_clipped(
        self,
        cap: Capture,
        grad_out: torch.Tensor,
        clip: torch.Tensor,
        state: Any,
        names: Sequence[str],
        sums: Dict[str, torch.Tensor],
        cache: Dict[Any, Any] | None = None,
    ) -> None:
        """Add ``sum_i clip_i * grad_i`` of each parameter in ``names`` to ``sums[name]``.

        ``clip`` has shape ``[B]`` (the engine folds ``1 / expected_batch_size``
        into it). ``sums[name]`` is a tensor of the parameter's shape to add into
        in place, or None (nothing accumulated yet): the rule then stores a new
        tensor there. ``grad_out`` and the captured activation must not be
        modified (autograd may hand one gradient tensor to several outputs, and
        an activation may be the caller's tensor). ``cache`` is shared by all
        rules for this phase of the step, as in :meth:`norm_sq`.
        """
        raise NotImplementedError

    def per_example_grads(
        self, cap: Capture, grad_out: torch.Tensor, names: Sequence[str]
    ) -> Dict[str, torch.Tensor]:
        """Instantiate per-example gradients ``{name: [B, *param.shape]}``.

        Used only for parameters used more than once per forward pass (tied
        weights, reused modules), whose per-example norm is the norm of the sum
        of all their uses.
        """
        raise NotImplementedError


def _add(sums: Dict[str, Any], name: str, value: torch.Tensor) -> None:
    """``sums[name] += value``, taking ``value`` itself when the slot is still empty (None)."""
    if sums.get(name) is None:
        sums[name] = value
    else:
        sums[name].add_(value)


# ---------------------------------------------------------------- per-step cache
# The engine passes each rule call a dict shared by all rules for one phase of one step (norms,
# then clipped sums). Entries derived from one input tensor (an activation gram, a clip-scaled
# activation) are keyed ``(tag, id(tensor))`` and shared by every layer reading that tensor (the
# query, key and value projections). The engine stores in ``cache[REMAINING]`` how many captured
# calls read each activation; :func:`release` drops a tensor's entries after its last reader, so
# the grams of all layers are never alive at once.

REMAINING = "_remaining"


def readers(cache: Dict[Any, Any], act: Any) -> int:
    """How many captured calls (this one included) still read ``act`` in this phase (1 if unknown)."""
    rem = cache.get(REMAINING)
    return max(1, rem.get(id(act), 1)) if rem is not None else 1


def shared(cache: Dict[Any, Any], act: Any, tag: str, build) -> Any:
    """``cache[(tag, id(act))]``, built with ``build()`` on first use."""
    key = (tag, id(act))
    val = cache.get(key)
    if val is None:
        val = build()
        cache[key] = val
    return val


def release(cache: Dict[Any, Any], act: Any) -> None:
    """Mark one read of ``act`` done; drop its cache entries after the last one."""
    rem = cache.get(REMAINING)
    if rem is None:
        return
    k = id(act)
    rem[k] = rem.get(k, 1) - 1
    if rem[k] <= 0:
        for key in [key for key in cache if isinstance(key, tuple) and len(key) == 2 and key[1] == k]:
            del cache[key]
