"""Batched DP-SGD: per-example clipping from one forward and one backward pass.

The engine hooks every module that owns trainable parameters. During the
forward pass it keeps each such module's input activation and output tensor;
:meth:`DPSGDEngine.accumulate` then runs ONE backward pass that asks autograd
only for the gradients of the loss sum with respect to those module outputs
(``torch.autograd.grad(..., inputs=outputs)``), so autograd never computes or
stores the ordinary parameter gradients. From the captured pairs
``(A, G)`` each layer rule computes

1. the per-example squared gradient norms of its parameters (ghost norm, sparse
   row sums, or small instantiation; see :mod:`dp.engine.rules`), summed over
   all trainable parameters of the model to give ``||g_i||``;
2. the clip factors ``c_i = min(1, C / ||g_i||)`` (Abadi et al. 2016, "Deep
   learning with differential privacy", Alg. 1);
3. the clipped sum ``sum_i c_i g_i`` from the same ``(A, G)`` with the clip
   factors folded into ``G`` (book-keeping, Bu et al. 2023, "Differentially
   private optimization on large model at small cost", ICML 2023, Alg. 1),
   with no second backward pass.

:meth:`DPSGDEngine.finalize` adds Gaussian noise ``N(0, (sigma C)^2)`` to the
accumulated clipped sum and divides by the expected batch size.
"""

from __future__ import annotations

import math

from collections import defaultdict
from typing import Any, Dict, List, Tuple

import torch
import torch.nn as nn

from .rules import Capture, registered_types, rule_for
from .rules.base import REMAINING, release


class UnsupportedModuleError(TypeError):
    """A module owns trainable parameters but no engine rule handles its type."""


class GradientEscapeError(RuntimeError):
    """A trainable parameter gets gradient from outside the forward of the module(s) owning it.

    E.g. ``F.linear(x, lin.weight)`` written in a parent's forward: the engine sees only what
    flows through ``lin``'s output, so that part of the gradient would be missing from the
    per-example norm and the clipped sum (the example's gradient would escape clipping).
    """


#: graph nodes one module call may create between its inputs and its output (a Linear needs
#: at most 4: view, addmm, view, transpose); a call needing more is cut off there, which can only
#: turn an allowed use into a reported one, never hide a use.
_MAX_REGION_NODES = 64


def _own_edges(output: torch.Tensor, inputs, params: Dict[int, nn.Parameter]) -> List[Tuple[Any, int]]:
    """Autograd edges ``(node, id(param))`` from inside one module call to its own parameters.

    Walks the autograd graph from ``output.grad_fn`` down to (not into) the ``grad_fn`` of the
    call's tensor inputs and the leaves, i.e. exactly the nodes the module's forward created,
    and returns every edge from such a node to the gradient accumulator of a parameter in
    ``params`` (``id -> parameter``; the module's own trainable parameters).
    """
    root = output.grad_fn
    if root is None:
        return []
    stop = {t.grad_fn for t in inputs if isinstance(t, torch.Tensor) and t.grad_fn is not None}
    edges, seen, stack = [], {root}, [root]
    while stack and len(seen) <= _MAX_REGION_NODES:
        node = stack.pop()
        for child, _ in node.next_functions:
            if child is None or child in seen or child in stop:
                continue
            var = getattr(child, "variable", None)
            if var is not None:  # AccumulateGrad of a leaf
                if id(var) in params and var is params[id(var)]:
                    edges.append((node, id(var)))
                continue
            seen.add(child)
            stack.append(child)
    return edges


class DPSGDEngine:
    """DP-SGD with per-example clipping over all trainable parameters, batched.

    Parameters
    ----------
    model : nn.Module
        The model. Every submodule that owns trainable parameters
        (``requires_grad=True``) must be an ``nn.Linear``, ``nn.Embedding`` or
        ``nn.LayerNorm`` (or a subclass); frozen parameters are skipped.
    noise_multiplier : float
        ``sigma`` (>= 0); the noise std is ``sigma * max_grad_norm``.
    max_grad_norm : float
        ``C`` (> 0), the per-example clipping norm (L2 over all trainable
        parameters together).
    expected_batch_size : float
        The divisor of the noisy sum (> 0); with Poisson sampling at rate ``q``
        over ``N`` examples this is ``q * N``, not the realised batch size.
    generator : dp.secure_random.NoiseSource or torch.Generator, optional
        Source of the Gaussian noise: a NoiseSource (secure, what the platform passes) or a
        torch.Generator on the parameters' device (benchmarks and tests).

    Raises
    ------
    UnsupportedModuleError
        If a module owning trainable parameters has no rule; the message names
        the module (its qualified name and type).
    ValueError
        For invalid hyper-parameters, a model without trainable parameters, or an
        unsupported configuration of a supported module.

    Notes
    -----
    Usage, one logical (Poisson) batch split into physical micro-batches::

        for micro in micro_batches:
            loss = compute_loss(model, micro)      # [B], not reduced
            norms = engine.accumulate(loss)        # [B], pre-clip norms
        engine.finalize()                          # sets p.grad
        optimizer.step(); optimizer.zero_grad()

    Parameters shared by several modules, or modules called more than once in
    one forward pass, are supported: for those parameters only, the per-example
    gradients are instantiated (``[B, *shape]``) and summed over the uses before
    the norm is taken, because the norm of a sum is not the sum of norms.

    Ids of shape ``[1, L]`` broadcast over a batch of ``B`` (Hugging Face BERT's
    position ids) need ``B``: the engine reads it from the model call's tensor
    arguments (the largest leading dimension among them).

    No gradient escapes clipping: the engine sees a parameter's gradient only through
    the outputs of the module calls that own it, so a use of a trainable parameter
    anywhere else in the forward pass (``F.linear(x, lin.weight)`` in a parent's
    forward, a module whose weight is read but which is never called) would leave
    that part out of the norm and the clipped sum. Before its backward pass, every
    step walks the autograd graph of the loss once (Python, ``O(nodes)``: about
    1 ms for a 6-layer BERT) and checks that every edge into a trainable
    parameter's gradient accumulator starts inside a captured call of a module
    owning that parameter (recorded by the forward hooks); otherwise it raises
    :class:`GradientEscapeError` naming the parameter, its module(s) and the
    autograd node that used it. Tied weights used through hooked modules (an
    embedding tied to an output Linear) and modules called several times are
    allowed uses.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: float,
        generator: torch.Generator | None = None,
    ) -> None:
        if noise_multiplier < 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
        if not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
        if not expected_batch_size > 0:
            raise ValueError(f"expected_batch_size must be > 0, got {expected_batch_size}")
        self.model = model
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        self.expected_batch_size = float(expected_batch_size)
        self.generator = generator

        # (module, rule, [(name, param)]) for every module owning trainable params.
        self._layers: List[Tuple[nn.Module, Any, List[Tuple[str, nn.Parameter]]]] = []
        uses: Dict[int, List[str]] = defaultdict(list)
        owners: Dict[int, List[str]] = defaultdict(list)
        for qualname, module in model.named_modules(remove_duplicate=True):
            own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            rule = rule_for(module)
            if rule is None:
                kinds = ", ".join(t.__name__ for t in registered_types())
                raise UnsupportedModuleError(
                    f"module '{qualname or '<root>'}' ({type(module).__name__}) has trainable parameters "
                    f"{[n for n, _ in own]} but the DP-SGD engine has no rule for it (supported: {kinds}). "
                    f"Freeze its parameters (requires_grad=False) or add a rule in dp/engine/rules/."
                )
            rule.check(module)
            self._layers.append((module, rule, own))
            for n, p in own:
                uses[id(p)].append(f"{qualname}.{n}" if qualname else n)
                owners[id(p)].append(f"'{qualname or '<root>'}' ({type(module).__name__})")
        self._params: List[nn.Parameter] = []
        seen = set()
        for p in model.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                self._params.append(p)
        if not self._params:
            raise ValueError("the model has no trainable parameters")
        #: names of parameters shared by several modules (per-example grads instantiated for these)
        self.tied_parameters = {pid: names for pid, names in uses.items() if len(names) > 1}
        self._names = dict(uses)
        self._owners = dict(owners)
        self._own = {id(m): {id(p): p for _, p in own} for m, _, own in self._layers}
        #: id(param) -> autograd nodes of this forward pass allowed to feed its gradient accumulator
        self._allowed: Dict[int, set] = defaultdict(set)

        self._records: List[Capture] = []
        self._batch_size: int | None = None
        self._sums: Dict[int, torch.Tensor] = {}
        self._hooks = [model.register_forward_pre_hook(self._root_pre_hook, with_kwargs=True)]
        for module, rule, _ in self._layers:
            self._hooks.append(module.register_forward_hook(self._make_hook(rule)))

    # ------------------------------------------------------------------ hooks
    def _root_pre_hook(self, module, args, kwargs):
        if not torch.is_grad_enabled():
            return None
        self._records = []
        self._allowed = defaultdict(set)
        sizes = [t.shape[0] for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor) and t.dim() >= 1]
        self._batch_size = max(sizes) if sizes else None
        return None

    def _make_hook(self, rule):
        def hook(module, inputs, output):
            if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad):
                return None
            act, new_out = rule.capture(module, inputs, output, self._batch_size)
            out = output if new_out is None else new_out
            self._records.append(Capture(module, act, out, out.shape[0] if out.dim() else 1, out._version))
            for node, pid in _own_edges(out, inputs, self._own[id(module)]):
                self._allowed[pid].add(node)
            return new_out

        return hook

    def detach(self) -> None:
        """Remove all hooks; the model behaves as before the engine was attached."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._records = []
        self._allowed = defaultdict(set)
        self._sums = {}

    # ------------------------------------------------------------ core step
    def _clip_step(self, per_example_loss: torch.Tensor, accumulate: bool) -> torch.Tensor:
        captured = self._backward(per_example_loss)
        if captured is None:
            return per_example_loss.detach().new_zeros(0)
        records, grads, B = captured
        return self._clip_from_grads(records, grads, per_example_loss.dtype, B, accumulate)

    def per_example_gradients(self, per_example_loss: torch.Tensor) -> Dict[nn.Parameter, torch.Tensor]:
        """Each example's gradient of every trainable parameter, unclipped: ``{param: [B, *param.shape]}``.

        Instantiated from the captured tensors by each layer's rule (``Rule.per_example_grads``:
        memory B x parameters); a parameter used several times in the pass gets the sum of its
        uses. Consumes the captured forward pass (one backward pass) like :meth:`accumulate`, but
        adds nothing to the running clipped sum. A parameter that got no gradient is absent.
        Raises as :meth:`accumulate` does.
        """
        captured = self._backward(per_example_loss)
        if captured is None:
            return {}
        records, grads, _ = captured
        layer_of = {id(m): (rule, own) for m, rule, own in self._layers}
        out: Dict[int, torch.Tensor] = {}
        with torch.no_grad():
            for k, r in enumerate(records):
                G, grads[k] = grads[k], None
                if G is None:
                    continue
                rule, own = layer_of[id(r.module)]
                pe = rule.per_example_grads(r, G, [n for n, _ in own])
                for n, p in own:
                    if n in pe:
                        out[id(p)] = pe[n] if id(p) not in out else out[id(p)] + pe[n]
        return {p: out[id(p)] for p in self._params if id(p) in out}

    def _backward(self, per_example_loss: torch.Tensor):
        """(records, gradients of the loss sum w.r.t. each captured output, B) of the captured forward pass, or None
        for an empty batch; checks the pass as :meth:`accumulate` documents."""
        if per_example_loss.dim() != 1:
            raise ValueError(
                f"per_example_loss must have shape [B] (one unreduced loss per example), got {tuple(per_example_loss.shape)}"
            )
        B = per_example_loss.shape[0]
        records, self._records = self._records, []
        if B == 0:
            return None
        if not records:
            raise RuntimeError(
                "no forward pass was captured: call the model (with gradients enabled) on the micro-batch "
                "before accumulate()"
            )
        for r in records:
            if r.batch_size != B:
                raise RuntimeError(
                    f"module {type(r.module).__name__} produced an output with leading dimension {r.batch_size} "
                    f"but the loss has B={B}; the engine needs the example dimension first in every layer's output"
                )
            if r.output._version != r.version:
                raise RuntimeError(
                    f"the output of {type(r.module).__name__} was modified in place after the forward hook; "
                    "the engine cannot capture its gradient"
                )
        allowed, self._allowed = self._allowed, defaultdict(set)
        self._check_no_escape(per_example_loss, allowed)
        grads = list(
            torch.autograd.grad(per_example_loss.sum(), [r.output for r in records], allow_unused=True)
        )
        return records, grads, B

    def _check_no_escape(self, loss: torch.Tensor, allowed: Dict[int, set]) -> None:
        """Raise :class:`GradientEscapeError` if a trainable parameter's gradient flows from outside its modules.

        Walks the loss' autograd graph once (iteratively, each node once) and checks every edge
        into the gradient accumulator of a trainable parameter against the edges the forward
        hooks recorded inside the calls of the modules owning it (``allowed``).
        """
        root = loss.grad_fn
        if root is None:
            return
        seen, stack = {root}, [root]
        while stack:
            node = stack.pop()
            for child, _ in node.next_functions:
                if child is None:
                    continue
                var = getattr(child, "variable", None)
                if var is not None:  # AccumulateGrad of a leaf
                    pid = id(var)
                    if pid in self._names and node not in allowed.get(pid, ()):
                        raise GradientEscapeError(
                            f"parameter {' = '.join(repr(n) for n in self._names[pid])} of module "
                            f"{', '.join(self._owners[pid])} gets a gradient from outside that module's forward "
                            f"(autograd node {node.name()}): the DP-SGD engine would leave that part out of the "
                            "per-example norm and the clipped sum. Use the parameter only through its module's "
                            "call (e.g. call the module instead of F.linear(x, module.weight)), or freeze it."
                        )
                    continue
                if child not in seen:
                    seen.add(child)
                    stack.append(child)

    @torch.no_grad()
    def _clip_from_grads(self, records, grads, dtype, B, accumulate):

        # Which parameters are used more than once in this forward pass?
        count: Dict[int, int] = defaultdict(int)
        layer_of = {id(m): (rule, own) for m, rule, own in self._layers}
        for r in records:
            for _, p in layer_of[id(r.module)][1]:
                count[id(p)] += 1

        norm_sq = torch.zeros(B, dtype=torch.promote_types(dtype, self._params[0].dtype), device=self._params[0].device)
        readers: Dict[int, int] = defaultdict(int)  # captured calls reading each activation
        for r in records:
            readers[id(r.activation)] += 1
        cache: Dict[Any, Any] = {REMAINING: dict(readers)}
        states: List[Any] = [None] * len(records)
        multi: Dict[int, torch.Tensor] = {}  # id(param) -> summed per-example grads [B, *shape]
        for k, r in enumerate(records):
            G = grads[k]
            if G is None:
                continue
            rule, own = layer_of[id(r.module)]
            single = [n for n, p in own if count[id(p)] == 1]
            shared = [n for n, p in own if count[id(p)] > 1]
            if single:
                ns, states[k] = rule.norm_sq(r, G, single, cache)
                norm_sq = norm_sq + ns.to(norm_sq.dtype)
            release(cache, r.activation)  # frees e.g. an activation gram after its last reader
            if shared:
                pe = rule.per_example_grads(r, G, shared)
                for n, p in own:
                    if n in pe:
                        multi[id(p)] = pe[n] if id(p) not in multi else multi[id(p)] + pe[n]
        cache.clear()
        for g in multi.values():
            norm_sq = norm_sq + g.pow(2).flatten(1).sum(1).to(norm_sq.dtype)
        norms = norm_sq.clamp_min(0).sqrt()
        if not accumulate:
            return norms
        C = self.max_grad_norm
        # min(1, C / ||g_i||), exact at ||g_i|| = 0, with 1 / expected_batch_size folded in, so that
        # the running sum is already the averaged clipped sum and finalize() needs no extra pass.
        # (C = infinity: no clipping, the non-private reference of mechanisms/fedsgd.py)
        clip = (C / norms.clamp_min(C) if math.isfinite(C) else torch.ones_like(norms)) / self.expected_batch_size
        cache = {REMAINING: dict(readers)}

        for k, r in enumerate(records):
            G = grads[k]
            grads[k] = None  # free as we go
            if G is None:
                continue
            rule, own = layer_of[id(r.module)]
            single = [n for n, p in own if count[id(p)] == 1]
            if single:
                sums = {n: self._sums.get(id(p)) for n, p in own if n in single}
                rule.add_clipped(r, G, clip, states[k], single, sums, cache)
                for n, p in own:
                    if n in single and sums.get(n) is not None:
                        self._sums[id(p)] = sums[n]
            states[k] = None
            release(cache, r.activation)
        cache.clear()
        for pid, g in multi.items():
            p = next(q for q in self._params if id(q) == pid)
            self._sum_for(p).add_(torch.tensordot(clip.to(g.dtype), g, dims=1))
        return norms

    def _sum_for(self, p: nn.Parameter) -> torch.Tensor:
        s = self._sums.get(id(p))
        if s is None:
            s = torch.zeros_like(p, memory_format=torch.contiguous_format).detach()
            self._sums[id(p)] = s
        return s

    # ------------------------------------------------------------ public API
    def accumulate(self, per_example_loss: torch.Tensor) -> torch.Tensor:
        """Backward, clip and add the clipped sum of one micro-batch to the running sum.

        Parameters
        ----------
        per_example_loss : Tensor, shape ``[B]``
            Unreduced loss of each example of the micro-batch, computed by the
            model forward pass that immediately precedes this call. ``B = 0`` is
            allowed (nothing is added).

        Returns
        -------
        Tensor, shape ``[B]``
            Per-example gradient L2 norms over all trainable parameters, before
            clipping (detached).

        Raises
        ------
        ValueError
            If the loss is not 1-D.
        RuntimeError
            If no forward pass was captured, or a layer's leading dimension is
            not ``B``.
        GradientEscapeError
            (a RuntimeError) If a trainable parameter is used outside the forward
            of the module(s) owning it (see the class notes); nothing is added.
        """
        return self._clip_step(per_example_loss, accumulate=True)

    def per_example_norms(self, per_example_loss: torch.Tensor) -> torch.Tensor:
        """Per-example gradient norms ``[B]`` of the preceding forward pass, without accumulating.

        Consumes the captured forward pass (one backward pass), like
        :meth:`accumulate`, but leaves the running clipped sum unchanged; raises
        as :meth:`accumulate` does.
        """
        return self._clip_step(per_example_loss, accumulate=False)

    @torch.no_grad()
    def finalize(self) -> None:
        """Set ``p.grad = (clipped_sum + N(0, (sigma C)^2 I)) / expected_batch_size``.

        Applies to every trainable parameter (noise is drawn for parameters with
        nothing accumulated, so an empty logical batch gives a noise-only step),
        then resets the running sum. Any previous ``p.grad`` is replaced.
        """
        # The running sums already carry the 1 / expected_batch_size factor (folded into the clip
        # factors), so the noise is drawn at std sigma C / expected_batch_size and added in place.
        std = (self.noise_multiplier * self.max_grad_norm / self.expected_batch_size
               if self.noise_multiplier > 0 else 0.0)  # sigma = 0 adds none (also with C = infinity)
        for p in self._params:
            s = self._sums.get(id(p))
            if s is None:
                s = torch.zeros_like(p, memory_format=torch.contiguous_format)
            if std > 0:
                if hasattr(self.generator, "add_normal_"):  # a dp.secure_random.NoiseSource
                    self.generator.add_normal_(s, std)
                else:
                    s.add_(torch.empty_like(s).normal_(0.0, std, generator=self.generator))
            p.grad = s
        self._sums = {}
