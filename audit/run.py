"""The privacy audit of a finished run: canaries on record, then measured leakage.

Two halves:

* At run start (server side): :func:`write_canaries` writes ``RUN_DIR/canaries.json`` (all M
  canaries: inclusion flag, secret, label NAME, device id) and :func:`record_canaries` marks
  them in the ledger's ``canaries`` table. Both are idempotent (safe on resume).
* After training: :func:`audit_run` (``dpfl audit RUN_DIR``) loads the run's final global
  model (``checkpoints/global.pt``) and measures

  - membership inference by loss (Yeom et al. 2018): every canary (included = member,
    excluded = non-member) and a sample of real training examples (from devices that trained)
    against held-out test examples; AUC and TPR at 1% and 0.1% FPR (Carlini et al. 2022);
  - empirical epsilon LOWER bounds from the canary guesses: the one-run audit (Steinke, Nasr &
    Jagielski 2023) and Clopper-Pearson (Jagielski, Ullman & Oprea 2020), each at confidence
    ``1 - (1 - confidence) / 2`` so that the larger of the two holds at ``confidence``;
  - exposure (Carlini et al. 2019) of each canary among the 10**d candidate secrets (exact, or
    estimated from sampled candidates);
  - extraction by model inversion (Parikh et al. 2022) of a subset of canaries.

  It writes ``RUN_DIR/audit/audit.json`` (schema below) and ``RUN_DIR/audit/roc.json`` (ROC
  curves), which ``dpfl report`` picks up.

An audit is a LOWER bound on the privacy loss: it can show that a run is less private than some
epsilon, never that it is private. Canaries inserted R times audit a group of R examples held by
one device; the guarantee that applies to such a group is the group-privacy bound R * epsilon
(at delta_R = R e^{(R-1) epsilon} delta), or the device-level epsilon when device-level DP is on.

``audit.json`` (the record is :class:`rundir.records.Audit`)::

    {"version": 1, "run_id", "run_dir", "model", "checkpoint_round", "dp", "device_dp",
     "delta", "confidence",
     "canaries": {"m", "included", "repeats", "n_digits", "source"},
     "membership": {"canaries": {"auc", "tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr", "n_members",
                                 "n_nonmembers"} | null,
                    "real": {... same ...} | null, "real_members": str},
     "epsilon_lower_bound": {"value", "confidence", "per_method_confidence",
                             "one_run": {...} | null, "clopper_pearson": {...} | null},
     "theoretical": {"epsilon_example_max", "epsilon_example_canary_devices",
                     "epsilon_device_max", "group_size", "epsilon_group", "delta_group"},
     "exposure": {"method", "n_candidates", "samples", "chance", "mean_included",
                  "mean_excluded", "max_included"} | null,
     "extraction": {"steps", "restarts", "chance_rate", "included": {...}, "excluded": {...}} | null,
     "per_canary": [{"canary_id", "included", "device_id", "label", "secret", "loss",
                     "exposure", "extracted"}],
     "seconds": {...}, "warnings": [str],
     "summary": {"epsilon_lower_bound", "confidence", "auc", "tpr_at_1pct_fpr",
                 "tpr_at_0_1pct_fpr", "mean_exposure", "mean_exposure_excluded",
                 "chance_exposure", "extraction_rate", "extraction_rate_excluded",
                 "membership_target", "epsilon_theoretical", "epsilon_theoretical_group"}}

Infinite numbers are written as the string ``"inf"`` (JSON has no infinity).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from dp.accounting import SubsampledGaussianEvent, compute_epsilons
from nlu.pooling import masked_mean
from rundir import (
    LedgerError, LedgerReader, RecordError, RunDirError, canaries_path, config_path, global_model_path, ledger_path,
    load_global_model,
    read_canaries_file, read_checkpoint_state, read_metric_lines, write_audit,
)
from rundir.layout import CANARIES_FILE
from settings.config import AUDIT_EXPOSURE_SAMPLES

from .bounds import clopper_pearson_threshold_sweep, one_run_audit_from_scores
from .canaries import Canary
from .exposure import expected_exposure_uniform, exposures
from .extraction import extraction_audit
from .membership import loss_scores, membership_metrics, roc_curve

__all__ = [
    "AuditError",
    "AuditOptions",
    "CANARIES_FILE",
    "read_canaries",
    "audit_run",
    "DEFAULT_EXPOSURE_SAMPLES",
]

#: Sampled candidates per canary for exposure (:data:`settings.config.AUDIT_EXPOSURE_SAMPLES`).
DEFAULT_EXPOSURE_SAMPLES = AUDIT_EXPOSURE_SAMPLES

class AuditError(ValueError):
    """The run directory cannot be audited (message says why and what to do)."""


# ----------------------------------------------------------------------------- canaries on record


def read_canaries(run_dir: str | os.PathLike) -> tuple[list[Canary], dict[int, int | None]] | None:
    """Canaries of ``RUN_DIR/canaries.json`` and canary_id -> device id; None if absent.

    Raises
    ------
    AuditError
        If the file is not valid JSON of the expected shape.
    """
    path = canaries_path(run_dir)
    try:
        payload = read_canaries_file(run_dir)
        if payload is None:
            return None
        entries = payload["canaries"]
        canaries = [Canary.from_dict(e) for e in entries]
        devices = {int(e["canary_id"]): e.get("device_id") for e in entries}
    except (RecordError, ValueError, KeyError, TypeError) as exc:
        raise AuditError(f"{path} is not a valid canaries file: {exc}") from exc
    return canaries, devices


# ----------------------------------------------------------------------------- the audit


@dataclass
class AuditOptions:
    """Settings of :func:`audit_run` (the ``dpfl audit`` flags).

    Attributes
    ----------
    exposure_samples : int
        Sampled candidate secrets per canary for exposure; 0 = all 10**d (exact, ~1 min per
        canary for MiniLM on 2 cores).
    extraction_steps, extraction_restarts : int
        Model-inversion attack settings (:func:`audit.extract_secret`).
    extraction_canaries : int
        Canaries attacked (half included, half excluded, lowest ids first); 0 = no extraction,
        -1 = all.
    real_samples : int
        Real training and held-out examples scored for membership (each).
    confidence : float
        Overall confidence of the reported epsilon lower bound.
    batch_size : int
        Scoring batch size.
    seed : int
    threads : int or None
        torch CPU threads (None: leave as is).
    """

    exposure_samples: int = DEFAULT_EXPOSURE_SAMPLES
    extraction_steps: int = 100
    extraction_restarts: int = 4
    extraction_canaries: int = 10
    real_samples: int = 500
    confidence: float = 0.95
    batch_size: int = 256
    seed: int = 0
    threads: int | None = None


class _InversionAdapter(nn.Module):
    """Give a mean-pooling classifier the ``inputs_embeds`` / ``get_input_embeddings`` interface
    that the inversion attack needs (same computation as :class:`nlu.pooling.MeanPoolClassifier`)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def get_input_embeddings(self):
        return self.inner.encoder.get_input_embeddings()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, inputs_embeds=None, **_):
        ref = input_ids if input_ids is not None else inputs_embeds[..., 0]
        if attention_mask is None:
            attention_mask = torch.ones(ref.shape[:2], dtype=torch.long, device=ref.device)
        states = self.inner.encoder(input_ids=input_ids, inputs_embeds=inputs_embeds,
                                    attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
        pooled = masked_mean(states, attention_mask)
        return type("Out", (), {"logits": self.inner.classifier(self.inner.dropout(pooled))})()


def _for_inversion(model: nn.Module) -> nn.Module:
    """The model as the inversion attack needs it: as is, wrapped in :class:`_InversionAdapter`, or :class:`AuditError`."""
    if hasattr(model, "get_input_embeddings"):
        return model
    if hasattr(model, "encoder") and hasattr(model, "classifier"):
        return _InversionAdapter(model)
    raise AuditError("the model does not expose its input embeddings; extraction is not possible")


def _clean(x: Any) -> Any:
    """``x`` made JSON-ready: numpy scalars as Python numbers, NaN as None, infinity as ``"inf"``, keys as strings."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        x = x.item()
    if isinstance(x, float):
        if math.isnan(x):
            return None
        if math.isinf(x):
            return "inf"
    return x


def _trained_devices(run_dir: Path, run_id: str, num_devices: int) -> tuple[list[int], str]:
    """Devices that trained at least once: from the ledger's example events, else metrics.jsonl."""
    ledger = ledger_path(run_dir)
    if ledger.exists():
        try:
            with LedgerReader(ledger, run_id) as reader:
                trained = reader.trained_devices("example")
            if trained:
                return trained, "ledger privacy events"
        except LedgerError:
            pass
    seen: set[int] = set()
    for row in read_metric_lines(run_dir, strict=False):
        seen |= {int(k) for k in (row.get("device_nodes") or {})}
    if seen:
        return sorted(seen), "metrics.jsonl (devices that replied)"
    return list(range(num_devices)), "all devices (no record of which trained)"


def _theoretical(run_dir: Path, dp_on: bool, delta: float, canary_devices: set[int], repeats: int,
                 warnings: list[str]) -> dict[str, Any]:
    """Accounted epsilons (recomputed from the ledger's events with dp.accounting, as the report does) to set beside the audit."""
    out: dict[str, Any] = {"epsilon_example_max": None, "epsilon_example_canary_devices": None,
                           "epsilon_device_max": None, "group_size": repeats,
                           "epsilon_group": None, "delta_group": None}
    if not dp_on:
        out.update(epsilon_example_max=math.inf, epsilon_example_canary_devices=math.inf,
                   epsilon_device_max=math.inf, epsilon_group=math.inf)
        return out
    try:
        with LedgerReader(ledger_path(run_dir)) as reader:
            runs = reader.runs()
            histories = {u: {d: [SubsampledGaussianEvent(*e.mechanism) for e in evs]
                             for d, evs in reader.events_by_device(u).items()} for u in ("example", "device")}
    except (LedgerError, OSError) as exc:
        warnings.append(f"theoretical epsilon not available: {exc}")
        return out
    accountant = (runs[0].accountant if runs else None) or "pld"
    ex = compute_epsilons(histories["example"], delta, accountant) if histories["example"] else {}
    if ex:
        out["epsilon_example_max"] = max(ex.values())
        cd = [ex.get(d, 0.0) for d in canary_devices]
        out["epsilon_example_canary_devices"] = max(cd) if cd else 0.0
        e = out["epsilon_example_canary_devices"]
        if repeats > 1:
            out["epsilon_group"] = repeats * e
            out["delta_group"] = min(1.0, repeats * math.exp(min(700.0, (repeats - 1) * e)) * delta)
        else:
            out["epsilon_group"], out["delta_group"] = e, delta
    if histories["device"]:
        dv = compute_epsilons(histories["device"], delta, accountant)
        out["epsilon_device_max"] = max(dv.values()) if dv else None
        if dv and out["epsilon_group"] is not None:
            out["epsilon_group"] = min(out["epsilon_group"], max(dv.get(d, 0.0) for d in canary_devices) if canary_devices else 0.0)
    return out


def _membership(scores: np.ndarray, labels: np.ndarray) -> tuple[dict | None, dict | None]:
    """Membership metrics and ROC curve of ``scores`` against ``labels`` (member = True); None, None without both classes."""
    y = np.asarray(labels, dtype=bool)
    if y.size == 0 or y.all() or (~y).all():
        return None, None
    m = membership_metrics(scores, y)
    fpr, tpr, _ = roc_curve(scores, y)
    return asdict(m), {"fpr": fpr.tolist(), "tpr": tpr.tolist()}


@dataclass
class _Loaded:
    """What every stage of the audit reads: the run's settings, data, canaries on record and final model.

    ``devices`` maps canary_id to the device that holds its copies (None for an excluded canary);
    ``source`` says where the canaries came from (``canaries.json`` or rebuilt from the settings);
    ``label2id`` maps label names to the model's class indices; ``ck_round`` is the round of the
    checkpoint audited; ``delta`` is the run's target delta.
    """

    run_dir: Path
    cfg: Any
    pop: Any
    canaries: list[Canary]
    devices: dict[int, int | None]
    source: str
    label2id: dict[str, int]
    delta: float
    model: nn.Module
    tok: Any
    ck_round: int | None

    @property
    def included(self) -> np.ndarray:
        """Each canary's inclusion flag (member = True), in canary order."""
        return np.array([c.included for c in self.canaries], dtype=bool)


@dataclass
class _MembershipResult:
    """Membership inference on canaries and on real examples: metrics, ROC curves and the canaries' scores.

    ``c_scores`` are the canaries' membership scores (negated losses), which the lower bounds
    reuse; ``members_from`` says how the training devices behind the real members were found.
    """

    c_scores: np.ndarray
    mi_can: dict | None
    roc_can: dict | None
    mi_real: dict | None
    roc_real: dict | None
    members_from: str


def audit_run(run_dir: str | os.PathLike, options: AuditOptions | None = None,
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Audit a finished run's final model; write ``RUN_DIR/audit/audit.json`` and ``roc.json``.

    The stages run in order: load the run, membership inference, epsilon lower bounds and the
    accounted epsilons, exposure, extraction, then the records are written.

    Parameters
    ----------
    run_dir : path
        A run directory with ``config.toml`` and ``checkpoints/global.pt``.
    options : AuditOptions, optional
    log : callable, optional
        Called with one progress line per stage.

    Returns
    -------
    dict
        The audit as written to ``audit.json`` (module docstring).

    Raises
    ------
    AuditError
        If the run directory lacks its config or checkpoint, the task is not intent
        classification, or the canaries cannot be read.
    """
    opts = options or AuditOptions()
    say = log or (lambda s: None)
    run_dir = Path(run_dir)
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    warnings: list[str] = []
    cfg = _check_run(run_dir, opts)
    run = _load_run(run_dir, cfg, warnings, seconds, say)
    mem = _membership_stage(run, opts, seconds, say)
    bounds = _lower_bounds(run, mem, opts)
    theo = _accounted(run, warnings)
    exposure, exp_vals = _exposure_stage(run, opts, seconds, say)
    extraction, recovered = _extraction_stage(run, opts, seconds, say)
    seconds["total"] = time.perf_counter() - t_start
    audit = _audit_record(run, opts, mem, bounds, theo, exposure, extraction,
                          _per_canary(run, mem, exp_vals, recovered), seconds, warnings)
    write_audit(run_dir, _clean(audit), _clean({"canaries": mem.roc_can, "real": mem.roc_real}))
    return _clean(audit)


# ----------------------------------------------------------------------------- load the run


def _check_run(run_dir: Path, opts: AuditOptions) -> Any:
    """The run's :class:`settings.config.RunConfig`, once the run directory is known to be auditable.

    Checks that ``config.toml`` and the global checkpoint exist, that the confidence is in (0, 1)
    and that the task is intent classification (raising :class:`AuditError` otherwise), and sets
    torch's CPU threads when ``opts.threads`` asks for it.
    """
    from settings.config import RunConfig

    if not config_path(run_dir).exists():
        raise AuditError(f"{run_dir} has no config.toml: not a run directory")
    ckpt = global_model_path(run_dir)
    if not ckpt.exists():
        raise AuditError(f"{ckpt} is absent: the run has not checkpointed a global model yet")
    if not 0.0 < opts.confidence < 1.0:
        raise AuditError(f"--confidence must be in (0, 1), got {opts.confidence}")
    cfg = RunConfig.from_toml(config_path(run_dir))
    if not int(cfg.canaries or 0) and read_canaries(run_dir) is None:
        raise AuditError(
            f"{run_dir} was trained without canaries, so there is nothing to audit (nothing was written): "
            "start a run with --canaries M (e.g. dpfl simulate --canaries 100 ...; --canary-repeats R plants "
            "R copies of each) and audit that run"
        )
    if cfg.task != "intent":
        raise AuditError(f"the audit supports --task intent only (this run: {cfg.task})")
    if opts.threads:
        torch.set_num_threads(int(opts.threads))
    return cfg


def _load_run(run_dir: Path, cfg: Any, warnings: list[str], seconds: dict[str, float],
              say: Callable[[str], None]) -> _Loaded:
    """Rebuild the run's population, read its canaries (:func:`_run_canaries`) and load its final global model.

    The delta is the run's ``--target-delta``, or the one the settings resolve for its training set.
    Records the time taken as ``seconds["load"]``; raises :class:`AuditError` when the checkpoint
    does not fit the run's model.
    """
    from nlu.model import build_model, load_tokenizer
    from partitions.population import build_population

    t0 = time.perf_counter()
    pop = build_population(cfg)
    names = list(pop.data.label_names)
    label2id = {n: i for i, n in enumerate(names)}
    canaries, devices, source = _run_canaries(run_dir, pop, label2id, warnings)
    delta = cfg.target_delta if cfg.target_delta is not None else cfg.resolve_delta(pop.data.num_train)
    model = build_model(cfg.model, len(names), seed=cfg.seed, pooling=cfg.pooling)
    try:
        load_global_model(run_dir, model)
    except RunDirError as exc:
        raise AuditError(str(exc)) from exc
    model.eval()
    tok = load_tokenizer(cfg.model)
    ck_round = (read_checkpoint_state(run_dir) or {}).get("round")
    seconds["load"] = time.perf_counter() - t0
    say(f"loaded the model of round {ck_round} and {len(canaries)} canaries ({source})")
    return _Loaded(run_dir, cfg, pop, canaries, devices, source, label2id, delta, model, tok, ck_round)


def _run_canaries(run_dir: Path, pop: Any, label2id: dict[str, int],
                  warnings: list[str]) -> tuple[list[Canary], dict[int, int | None], str]:
    """The canaries to audit, canary_id -> device, and where they came from: ``canaries.json``, else rebuilt.

    Rebuilt canaries (no ``canaries.json``) or a ``canaries.json`` that differs from the rebuilt
    ones add a warning. Every canary's label must be a label of the data set (else
    :class:`AuditError`); labels are returned as strings.
    """
    on_record = read_canaries(run_dir)
    if on_record is not None:
        canaries, devices = on_record
        source = CANARIES_FILE
        rebuilt = {c.canary_id: (c.secret, c.included) for c in pop.canaries}
        if rebuilt and rebuilt != {c.canary_id: (c.secret, c.included) for c in canaries}:
            warnings.append("canaries.json differs from the canaries the settings rebuild; canaries.json was used "
                            "(but the rebuilt population, used for the real-data samples, may not match the run)")
    else:
        canaries = list(pop.canaries)
        devices = {c.canary_id: pop.canary_device().get(c.canary_id) for c in canaries}
        source = "rebuilt from config.toml (no canaries.json)"
        if canaries:
            warnings.append("no canaries.json in the run directory: canaries were rebuilt from the settings "
                            "(deterministic in the seed, but not the run's own record)")
    for c in canaries:
        if str(c.label) not in label2id:
            raise AuditError(f"canary {c.canary_id}'s label {c.label!r} is not a label of the data set")
    canaries = [Canary(c.canary_id, c.text, c.prefix, c.secret, str(c.label), c.included, c.repeats, c.suffix)
                for c in canaries]
    return canaries, devices, source


# ----------------------------------------------------------------------------- membership inference


def _membership_stage(run: _Loaded, opts: AuditOptions, seconds: dict[str, float],
                      say: Callable[[str], None]) -> _MembershipResult:
    """Membership inference by loss: included against excluded canaries, then real training against held-out examples.

    Records the time taken as ``seconds["membership"]``.
    """
    t0 = time.perf_counter()
    canaries, cfg = run.canaries, run.cfg
    c_scores = loss_scores(run.model, run.tok, [c.text for c in canaries],
                           [run.label2id[c.label] for c in canaries],
                           batch_size=opts.batch_size, max_length=cfg.max_length) if canaries else np.zeros(0)
    mi_can, roc_can = _membership(c_scores, run.included)
    mi_real, roc_real, members_from = _real_membership(run, opts)
    seconds["membership"] = time.perf_counter() - t0
    say(f"membership: canaries AUC {mi_can['auc'] if mi_can else None}, real AUC {mi_real['auc'] if mi_real else None}")
    return _MembershipResult(c_scores, mi_can, roc_can, mi_real, roc_real, members_from)


def _real_membership(run: _Loaded, opts: AuditOptions) -> tuple[dict | None, dict | None, str]:
    """Membership metrics and ROC of real examples: a sample from devices that trained against held-out test examples.

    Up to ``opts.real_samples`` of each, drawn with seed ``[opts.seed, 17]``; canary copies are not
    members here. Also returns how the training devices were found (:func:`_trained_devices`).
    """
    pop, cfg = run.pop, run.cfg
    rng = np.random.default_rng([opts.seed, 17])
    trained, members_from = _trained_devices(run.run_dir, cfg.run_id, pop.num_devices)
    rows = np.concatenate([pop.devices[d] for d in trained if d < pop.num_devices] or [np.zeros(0, np.int64)])
    if rows.size:
        rows = rows[pop.uids(rows) >= 0]  # real examples only, not canary copies
    rows = np.unique(rows)
    n_tr = min(opts.real_samples, rows.size)
    n_te = min(opts.real_samples, len(pop.data.test))
    if not (n_tr and n_te):
        return None, None, members_from
    tr_rows = np.sort(rng.choice(rows, size=n_tr, replace=False))
    te_rows = np.sort(rng.choice(len(pop.data.test), size=n_te, replace=False))
    tr = pop.data.select_train(tr_rows.tolist())
    te = pop.data.test.select(te_rows.tolist())
    s_tr = loss_scores(run.model, run.tok, tr["text"], tr["label"], opts.batch_size, cfg.max_length)
    s_te = loss_scores(run.model, run.tok, te["text"], te["label"], opts.batch_size, cfg.max_length)
    mi_real, roc_real = _membership(np.r_[s_tr, s_te], np.r_[np.ones(n_tr, bool), np.zeros(n_te, bool)])
    return mi_real, roc_real, members_from


# ----------------------------------------------------------------------------- bounds


def _lower_bounds(run: _Loaded, mem: _MembershipResult, opts: AuditOptions) -> dict[str, Any]:
    """Empirical epsilon lower bounds from the canary guesses: one-run and Clopper-Pearson, and the larger of the two.

    Each is computed at ``1 - (1 - confidence) / 2`` so that the larger holds at ``confidence``.
    The one-run result carries its ``ceiling``: what it could show with these canaries if every
    guess were right. Returns ``per_method``, ``one_run``, ``cp`` and ``value`` (None without canaries).
    """
    per_method = 1.0 - (1.0 - opts.confidence) / 2.0
    one_run = cp = None
    included = run.included
    if run.canaries and mem.mi_can is not None:
        r1 = one_run_audit_from_scores(mem.c_scores, included, run.delta, per_method)
        one_run = asdict(r1)
        r2 = clopper_pearson_threshold_sweep(mem.c_scores, included, run.delta, per_method)
        cp = asdict(r2)
        # What the one-run audit could show at best with these m canaries (every guess right):
        # a small m caps the lower bound whatever the leakage.
        best = one_run_audit_from_scores(included.astype(float), included, run.delta, per_method)
        one_run["ceiling"] = best.epsilon_lower_bound
    values = [x["epsilon_lower_bound"] for x in (one_run, cp) if x is not None]
    return {"per_method": per_method, "one_run": one_run, "cp": cp, "value": max(values) if values else None}


def _accounted(run: _Loaded, warnings: list[str]) -> dict[str, Any]:
    """The accounted epsilons to set beside the bounds (:func:`_theoretical`), for the devices of the included canaries.

    The group size is the canaries' number of copies (1 without canaries).
    """
    canaries, cfg = run.canaries, run.cfg
    canary_devs = {int(d) for c in canaries if c.included and (d := run.devices.get(c.canary_id)) is not None}
    repeats = canaries[0].repeats if canaries else 1
    return _theoretical(run.run_dir, bool(cfg.dp) or bool(getattr(cfg, "device_dp", False)), run.delta,
                        canary_devs, repeats, warnings)


# ----------------------------------------------------------------------------- exposure


def _exposure_stage(run: _Loaded, opts: AuditOptions, seconds: dict[str, float],
                    say: Callable[[str], None]) -> tuple[dict[str, Any] | None, np.ndarray]:
    """Exposure of each canary's secret among the 10**d candidates (exact, or from ``opts.exposure_samples`` sampled ones).

    Returns the exposure record (None without canaries) and each canary's exposure in bits (NaN
    without canaries). Records the time taken as ``seconds["exposure"]``.
    """
    t0 = time.perf_counter()
    canaries, included = run.canaries, run.included
    m = len(canaries)
    exp_block = None
    exp_vals = np.full(m, np.nan)
    if m:
        n_cand = 10 ** canaries[0].n_digits
        samples = opts.exposure_samples if opts.exposure_samples and opts.exposure_samples < n_cand - 1 else None
        exp_vals = exposures(run.model, run.tok, canaries, run.label2id, batch_size=max(opts.batch_size, 512),
                             n_samples=samples, seed=opts.seed)
        exp_block = {
            "method": "exact" if samples is None else "sampled",
            "n_candidates": n_cand, "samples": samples,
            "chance": expected_exposure_uniform(n_cand), "max_possible": math.log2(n_cand),
            "mean_included": float(exp_vals[included].mean()) if included.any() else None,
            "mean_excluded": float(exp_vals[~included].mean()) if (~included).any() else None,
            "max_included": float(exp_vals[included].max()) if included.any() else None,
        }
    seconds["exposure"] = time.perf_counter() - t0
    say(f"exposure ({exp_block['method'] if exp_block else 'no canaries'}): "
        f"included {exp_block and exp_block['mean_included']}, excluded {exp_block and exp_block['mean_excluded']} "
        f"({seconds['exposure']:.0f} s)")
    return exp_block, exp_vals


# ----------------------------------------------------------------------------- extraction


def _extraction_stage(run: _Loaded, opts: AuditOptions, seconds: dict[str, float],
                      say: Callable[[str], None]) -> tuple[dict[str, Any] | None, dict[int, str]]:
    """Extraction by model inversion of ``opts.extraction_canaries`` canaries (half included, half excluded, lowest ids first).

    Returns the extraction record (None when no canary is attacked) and canary_id -> recovered
    secret. Records the time taken as ``seconds["extraction"]``.
    """
    t0 = time.perf_counter()
    canaries = run.canaries
    m = len(canaries)
    ext_block = None
    recovered: dict[int, str] = {}
    k = m if opts.extraction_canaries < 0 else min(m, opts.extraction_canaries)
    if k > 0:
        inc = [c for c in canaries if c.included]
        exc = [c for c in canaries if not c.included]
        n_inc = min(len(inc), max(k - min(len(exc), k // 2), 0))
        chosen_inc, chosen_exc = inc[:n_inc], exc[: k - n_inc]
        attack = _for_inversion(run.model)
        kw = dict(steps=opts.extraction_steps, restarts=opts.extraction_restarts, seed=opts.seed)
        parts = {}
        for name, group in (("included", chosen_inc), ("excluded", chosen_exc)):
            if not group:
                parts[name] = None
                continue
            rep = extraction_audit(attack, run.tok, group, run.label2id, **kw)
            recovered.update(rep.recovered)
            parts[name] = {"n": rep.n_canaries, "n_exact": rep.n_exact, "rate": rep.exact_rate,
                           "digit_accuracy": rep.digit_accuracy}
        ext_block = {"steps": opts.extraction_steps, "restarts": opts.extraction_restarts,
                     "chance_rate": 10.0 ** (-canaries[0].n_digits), "chance_digit_accuracy": 0.1, **parts}
    seconds["extraction"] = time.perf_counter() - t0
    if ext_block:
        say(f"extraction: included {ext_block['included']}, excluded {ext_block['excluded']} "
            f"({seconds['extraction']:.0f} s)")
    return ext_block, recovered


# ----------------------------------------------------------------------------- write records


def _per_canary(run: _Loaded, mem: _MembershipResult, exp_vals: np.ndarray,
                recovered: dict[int, str]) -> list[dict[str, Any]]:
    """One entry per canary: id, inclusion, device, label, secret, text, loss, exposure and the secret extracted (if any)."""
    m = len(run.canaries)
    return [
        {"canary_id": c.canary_id, "included": c.included, "device_id": run.devices.get(c.canary_id),
         "label": c.label, "secret": c.secret, "text": c.text, "loss": float(-mem.c_scores[i]),
         "exposure": float(exp_vals[i]) if m else None, "extracted": recovered.get(c.canary_id)}
        for i, c in enumerate(run.canaries)
    ]


def _audit_record(run: _Loaded, opts: AuditOptions, mem: _MembershipResult, bounds: dict[str, Any],
                  theo: dict[str, Any], exp_block: dict[str, Any] | None, ext_block: dict[str, Any] | None,
                  per_canary: list[dict[str, Any]], seconds: dict[str, float], warnings: list[str]) -> dict[str, Any]:
    """The ``audit.json`` record (module docstring) from the stages' results, before infinities become ``"inf"``.

    Its ``summary`` (:func:`_audit_summary`) is what ``dpfl report`` shows.
    """
    cfg, canaries = run.cfg, run.canaries
    m = len(canaries)
    return {
        "version": 1, "run_id": cfg.run_id, "run_dir": str(run.run_dir), "model": cfg.model,
        "checkpoint_round": run.ck_round, "dp": bool(cfg.dp), "device_dp": bool(cfg.device_dp),
        "delta": run.delta, "confidence": opts.confidence,
        "canaries": {"m": m, "included": int(run.included.sum()), "repeats": canaries[0].repeats if canaries else 1,
                     "n_digits": canaries[0].n_digits if m else None, "source": run.source},
        "membership": {"canaries": mem.mi_can, "real": mem.mi_real, "real_members": mem.members_from,
                       "real_nonmembers": "test split"},
        "epsilon_lower_bound": {
            "value": bounds["value"], "confidence": opts.confidence, "per_method_confidence": bounds["per_method"],
            "one_run": bounds["one_run"], "clopper_pearson": bounds["cp"],
            "note": "Empirical LOWER bounds: with the stated confidence the run is not (epsilon, delta)-DP "
                    "for any epsilon below the value; they never certify privacy. The Clopper-Pearson bound "
                    "treats the canaries as independent trials (Jagielski et al. use one canary per training "
                    "run); the one-run bound (Steinke et al.) is the one whose assumptions hold for many "
                    "canaries in one run.",
        },
        "theoretical": theo,
        "exposure": exp_block,
        "extraction": ext_block,
        "per_canary": per_canary,
        "options": asdict(opts),
        "seconds": seconds,
        "warnings": warnings,
        "summary": _audit_summary(run, opts, mem, bounds, theo, exp_block, ext_block),
    }


def _audit_summary(run: _Loaded, opts: AuditOptions, mem: _MembershipResult, bounds: dict[str, Any],
                   theo: dict[str, Any], exp_block: dict[str, Any] | None,
                   ext_block: dict[str, Any] | None) -> dict[str, Any]:
    """The record's ``summary``: the headline numbers (lower bound, AUC and TPRs, exposure, extraction rates, accounted epsilon).

    The membership headline is the canaries' when they were scored, else the real examples'.
    """
    mi_can, mi_real, one_run = mem.mi_can, mem.mi_real, bounds["one_run"]
    main_mi = mi_can or mi_real
    return {
        "epsilon_lower_bound": bounds["value"],
        "confidence": opts.confidence,
        "delta": run.delta,
        "membership_target": "canaries" if mi_can else ("real examples" if mi_real else None),
        "auc": main_mi["auc"] if main_mi else None,
        "tpr_at_1pct_fpr": main_mi["tpr_at_1pct_fpr"] if main_mi else None,
        "tpr_at_0_1pct_fpr": main_mi["tpr_at_0_1pct_fpr"] if main_mi else None,
        "auc_real": mi_real["auc"] if mi_real else None,
        "mean_exposure": exp_block["mean_included"] if exp_block else None,
        "mean_exposure_excluded": exp_block["mean_excluded"] if exp_block else None,
        "chance_exposure": exp_block["chance"] if exp_block else None,
        "extraction_rate": (ext_block.get("included") or {}).get("rate") if ext_block else None,
        "extraction_rate_excluded": (ext_block.get("excluded") or {}).get("rate") if ext_block else None,
        "epsilon_lower_bound_ceiling": one_run["ceiling"] if one_run else None,
        "epsilon_theoretical": theo.get("epsilon_example_max"),
        "epsilon_theoretical_group": theo.get("epsilon_group"),
        "canaries": len(run.canaries), "canary_repeats": run.canaries[0].repeats if run.canaries else 1,
    }
