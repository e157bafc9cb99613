"""``dpfl partitions``: look at a device partition before training on it.

Takes ``dpfl simulate``'s data and partition flags (the ``data`` setting group) and the run
settings that shape the population (``--seed``, ``--rounds`` of the continual stream,
``--run-dir``; ``--cohort-size`` only so that a small ``--num-devices`` validates), builds the
partition, and reports:

- devices and examples per device: min / median / mean / max, empty devices, and a table of
  the largest devices;
- label skew: mean per-device label entropy (nats; the global label entropy beside it) and
  the mean total-variation distance between a device's label distribution and the global
  one (0 = i.i.d., 1 = disjoint label sets); with ``--partitioner cluster`` the same two
  numbers over k-means clusters (feature skew);
- with ``--setting continual``: examples held per round (total, active devices, max) under
  ``--storage-cap``.

It writes to ``--out DIR`` (default: ``RUN_DIR/partitions`` when ``--run-dir`` is given,
else a new folder ``runs/partitions-<timestamp>``; the path is printed):

- ``label_distribution.png``: labels per device for the largest devices
  (``flwr_datasets.visualization.plot_label_distributions``);
- ``activity_histogram.png``: devices by activity (examples held); in the continual setting
  at the first, middle and last round, with the total held per round beside it;
- ``partition_stats.json``: the numbers printed.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from dpfl.commands.errors import exits
from dpfl.commands.flags import add_config_args, config_from_args

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # plot_label_distributions posts telemetry otherwise

__all__ = ["POPULATION_FLAGS", "add_parser", "run", "partition_stats"]

#: RunConfig fields outside the data group that ``dpfl partitions`` takes: the seed and the rounds shape the
#: partition and the continual stream, ``--run-dir`` places the output, and ``--cohort-size`` must not exceed
#: ``--num-devices`` for the settings to validate.
POPULATION_FLAGS = ("seed", "rounds", "run_dir", "cohort_size")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``partitions`` subcommand to ``subparsers`` (the data flags, :data:`POPULATION_FLAGS` and its own);
    return its parser."""
    p = subparsers.add_parser(
        "partitions",
        help="show a device partition: sizes, label skew, plots (no training)",
        description="Build the device partition of the given settings and report sizes, label skew and "
        "(with --setting continual) activity over the rounds; write plots to --out.",
    )
    add_config_args(p, groups=("data",), also=POPULATION_FLAGS)
    p.add_argument("--min-partition-size", type=int, default=0,
                   help="minimum examples per device (iid, dirichlet, cluster, quantity) (default: 0)")
    p.add_argument("--out", default=None,
                   help="folder for the plots and partition_stats.json (default: RUN_DIR/partitions with "
                   "--run-dir, else a new folder runs/partitions-<timestamp>)")
    p.add_argument("--top", type=int, default=10, help="rows in the table of largest devices (default 10)")
    return p


def _entropy(p: np.ndarray) -> np.ndarray:
    """Row-wise entropy (nats) of probability rows."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)


def partition_stats(devices: list, values: np.ndarray, num_values: int) -> dict:
    """Skew of a categorical column (labels, clusters) over devices.

    Returns
    -------
    dict
        ``mean_entropy`` (mean over non-empty devices of the entropy of the device's
        distribution, nats), ``global_entropy``, ``mean_tv`` (mean total-variation distance
        of a device's distribution to the global one), ``mean_distinct`` (values per device).
    """
    values = np.asarray(values, dtype=np.int64)
    sizes = np.array([len(d) for d in devices], dtype=np.int64)
    rows = np.concatenate([np.asarray(d, dtype=np.int64) for d in devices]) if len(devices) else np.zeros(0, np.int64)
    dev = np.repeat(np.arange(len(devices)), sizes)
    counts = np.bincount(dev * num_values + values[rows], minlength=len(devices) * num_values).reshape(
        len(devices), num_values)
    nonempty = sizes > 0
    p = counts[nonempty] / sizes[nonempty, None]
    glob = np.bincount(values, minlength=num_values) / max(len(values), 1)
    return {
        "mean_entropy": float(_entropy(p).mean()) if len(p) else 0.0,
        "global_entropy": float(_entropy(glob[None, :])[0]),
        "mean_tv": float(0.5 * np.abs(p - glob[None, :]).sum(axis=1).mean()) if len(p) else 0.0,
        "mean_distinct": float((counts[nonempty] > 0).sum(axis=1).mean()) if len(p) else 0.0,
    }


def _out_dir(ns) -> Path:
    if getattr(ns, "out", None):
        return Path(ns.out)
    if getattr(ns, "run_dir", None):
        return Path(ns.run_dir) / "partitions"
    import secrets
    import time

    return Path("runs") / f"partitions-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def _plot_labels(train, devices: list, label_names: list[str], shown: np.ndarray, path: Path) -> None:
    import datasets
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from flwr_datasets.partitioner import Partitioner
    from flwr_datasets.visualization import plot_label_distributions

    class _Fixed(Partitioner):
        """The shown devices of an already computed partition, as partitions 0 .. len(shown)-1."""

        def __init__(self, parts):
            super().__init__()
            self._parts = parts

        @property
        def num_partitions(self) -> int:
            """The number of shown devices."""
            return len(self._parts)

        def load_partition(self, partition_id: int):
            """The rows of shown device ``partition_id``."""
            return self.dataset.select(self._parts[partition_id])

    labels = np.asarray(train.select_columns(["label"]).with_format("numpy")[:]["label"], dtype=np.int64)
    ds = datasets.Dataset.from_dict({"label": labels},
                                    features=datasets.Features({"label": datasets.ClassLabel(names=label_names)}))
    fixed = _Fixed([np.asarray(devices[d], dtype=np.int64) for d in shown])
    fixed.dataset = ds
    legend = len(label_names) <= 20
    fig, ax, _ = plot_label_distributions(
        fixed, "label", plot_type="bar", size_unit="absolute", legend=legend, verbose_labels=True,
        title=f"Labels on the {len(shown)} largest of {len(devices)} devices",
        figsize=(max(6.0, 0.3 * len(shown) + 3), 5),
        plot_kwargs={"xlabel": "device id", "ylabel": "examples", "width": 0.85},
    )
    ax.set_xticks(range(len(shown)))
    ax.set_xticklabels([str(int(d)) for d in shown], rotation=90, fontsize=7)
    for tick in ax.get_xticklabels():
        tick.set_visible(True)  # flwr-datasets hides every other one beyond 20 partitions
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _plot_activity(sizes: np.ndarray, per_round: dict[int, np.ndarray] | None, totals: np.ndarray | None,
                   path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if per_round is None:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.hist(sizes, bins=min(50, max(5, len(np.unique(sizes)))), color="tab:blue")
        ax.set_xlabel("activity a_k (training examples held)")
        ax.set_ylabel("devices")
        ax.set_title(f"Activity of {len(sizes)} devices")
        ax.set_yscale("log")
    else:
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        top = max(int(a.max()) for a in per_round.values()) if per_round else 1
        bins = np.linspace(0, max(top, 1), min(50, max(top, 1)) + 1)
        for t, a in per_round.items():
            ax.hist(a, bins=bins, histtype="step", linewidth=1.5, label=f"round {t}")
        ax.set_xlabel("activity a_k(t) (training examples held)")
        ax.set_ylabel("devices")
        ax.set_yscale("log")
        ax.legend()
        ax.set_title("Activity over the rounds")
        ax2.plot(np.arange(1, len(totals) + 1), totals, marker=".")
        ax2.set_xlabel("round")
        ax2.set_ylabel("examples held (all devices)")
        ax2.set_title("Examples held per round")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _build(cfg, min_partition_size: int = 0):
    """Load the data and partition it as the run would (same auto rule as the population)."""
    import inspect

    from partitions import load_data, partition

    kw = dict(data_dir=cfg.data_dir, dataset=cfg.dataset, text_column=cfg.text_column,
              label_column=cfg.label_column, max_examples=cfg.max_examples, seed=cfg.seed,
              synthetic_devices=cfg.num_devices)
    if "device_column" in inspect.signature(load_data).parameters:
        kw["device_column"] = cfg.device_column
    data = load_data(**kw)
    name = cfg.partitioner
    if name == "auto":
        name = "natural" if cfg.device_column in data.train_columns else "iid"
    devices = partition(data.train, cfg.num_devices, name, seed=cfg.seed, dirichlet_alpha=cfg.dirichlet_alpha,
                        quantity_beta=cfg.quantity_beta, min_partition_size=min_partition_size,
                        device_column=cfg.device_column, num_clusters=cfg.num_clusters)
    return data, name, devices


@exits
def run(ns: argparse.Namespace) -> int:
    """Run ``dpfl partitions`` for parsed arguments; return the exit code (2 for bad input)."""
    cfg = config_from_args(ns)  # validates --setting and --storage-cap too
    setting, cap = cfg.setting, cfg.storage_cap
    data, name, devices = _build(cfg, getattr(ns, "min_partition_size", 0) or 0)
    out = _out_dir(ns)
    out.mkdir(parents=True, exist_ok=True)
    labels = np.asarray(data.train.select_columns(["label"]).with_format("numpy")[:]["label"], dtype=np.int64)
    sizes = np.array([len(d) for d in devices], dtype=np.int64)
    stats: dict = {
        "source": data.source, "partitioner": name, "num_devices": len(devices), "examples": int(sizes.sum()),
        "seed": cfg.seed,
        "sizes": {"min": int(sizes.min()), "median": float(np.median(sizes)), "mean": float(sizes.mean()),
                  "max": int(sizes.max()), "empty_devices": int((sizes == 0).sum())},
        "label_skew": partition_stats(devices, labels, data.num_labels),
    }
    print(f"data: {data.source}")
    print(f"partitioner: {name}   devices: {len(devices)}   examples: {int(sizes.sum())}")
    s = stats["sizes"]
    print(f"examples per device: min {s['min']}  median {s['median']:g}  mean {s['mean']:.1f}  max {s['max']}"
          f"  (empty devices: {s['empty_devices']})")
    ls = stats["label_skew"]
    print(f"label skew: mean per-device label entropy {ls['mean_entropy']:.3f} nats "
          f"(global {ls['global_entropy']:.3f}); mean total-variation distance to the global label "
          f"distribution {ls['mean_tv']:.3f}; labels per device {ls['mean_distinct']:.1f} of {data.num_labels}")
    if name == "cluster":
        from partitions.partitioners import cluster_ids

        k = cfg.num_clusters
        stats["cluster_skew"] = partition_stats(devices, cluster_ids(data.train, k, seed=cfg.seed), k)
        cs = stats["cluster_skew"]
        print(f"feature (cluster) skew: mean per-device cluster entropy {cs['mean_entropy']:.3f} nats "
              f"(global {cs['global_entropy']:.3f}); mean TV distance {cs['mean_tv']:.3f}")

    order = np.argsort(-sizes, kind="stable")
    top = order[: max(0, ns.top if getattr(ns, "top", None) is not None else 10)]
    stats["largest"] = []
    print(f"\n{'device':>8} {'examples':>9} {'labels':>7}  top label (share)")
    for d in top:
        lab = labels[devices[d]]
        if len(lab) == 0:
            continue
        c = np.bincount(lab, minlength=data.num_labels)
        best = int(c.argmax())
        row = {"device": int(d), "examples": int(sizes[d]), "labels": int((c > 0).sum()),
               "top_label": data.label_names[best], "top_share": float(c[best] / len(lab))}
        stats["largest"].append(row)
        print(f"{d:>8} {sizes[d]:>9} {row['labels']:>7}  {row['top_label']} ({row['top_share']:.0%})")

    per_round = totals = None
    if setting == "continual":
        from partitions.continual import activity_at, make_stream

        stream = make_stream(devices, cfg.rounds, seed=cfg.seed, storage_cap=cap)
        acts = np.stack([activity_at(stream, devices, t) for t in range(1, cfg.rounds + 1)])  # [R, K]
        totals = acts.sum(axis=1)
        marks = sorted({1, (cfg.rounds + 1) // 2, cfg.rounds})
        per_round = {t: acts[t - 1] for t in marks}
        changed = [int((acts[t] != acts[t - 1]).sum()) for t in range(1, cfg.rounds)]
        stats["continual"] = {
            "rounds": cfg.rounds, "storage_cap": cap,
            "held_total": totals.tolist(),
            "active_devices": (acts > 0).sum(axis=1).tolist(),
            "held_max": acts.max(axis=1).tolist(),
            "devices_whose_activity_changed": changed,
        }
        print(f"\ncontinual setting over {cfg.rounds} rounds (storage cap {cap if cap is not None else 'none'}):")
        print(f"{'round':>6} {'held':>8} {'active':>7} {'max':>5}")
        for t in sorted(set(marks) | set(range(1, min(cfg.rounds, 5) + 1))):
            a = acts[t - 1]
            print(f"{t:>6} {int(a.sum()):>8} {int((a > 0).sum()):>7} {int(a.max()):>5}")

    nonempty = [int(d) for d in order[: min(30, len(order))] if sizes[d] > 0]
    _plot_labels(data.train, devices, data.label_names, np.array(nonempty, dtype=np.int64),
                 out / "label_distribution.png")
    _plot_activity(sizes, per_round, totals, out / "activity_histogram.png")
    (out / "partition_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(f"\nwrote {out / 'label_distribution.png'}, {out / 'activity_histogram.png'}, "
          f"{out / 'partition_stats.json'}")
    return 0
