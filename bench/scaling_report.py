"""Writes a `bench.scaling` run: scaling.json, a Markdown page of tables (scaling.md) and a chart
(scaling.png). `python -m bench.scaling_report` re-renders the last two from the first."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.common import RESULTS


def write(run: dict[str, Any], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "scaling.json"
    data.write_text(json.dumps(run, indent=2) + "\n")
    md = folder / "scaling.md"
    md.write_text(markdown(run))
    png = folder / "scaling.png"
    chart(run, png)
    return [data, md, png]


def _n(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def _section(rows: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [r for r in rows if r["section"] == name]


def _failed(row: dict[str, Any]) -> bool:
    return bool(row["error"]) or not row["rate"]


def _base(rows: list[dict[str, Any]], row: dict[str, Any], **match: Any) -> float:
    """The rate of the row of the same broker and isolation that `match` picks (a ratio's base)."""
    for r in rows:
        if (
            r["broker"] == row["broker"]
            and r["isolation"] == row["isolation"]
            and all(r[k] == v for k, v in match.items())
            and not _failed(r)
        ):
            return float(r["rate"])
    return 0.0


def _ratio(rate: float, base: float) -> str:
    return f"{rate / base:.2f}" if base else "—"


def _cores(r: dict[str, Any]) -> str:
    if not r["cores"]:
        return "—"
    broker = r.get("broker_cores", 0.0)
    return f"{r['cores']:.2f} ({r['poller_cores']:.2f}) + {broker:.2f} of {r['machine_cores']:.2f}"


def _per_cpu(r: dict[str, Any]) -> str:
    return _n(r["records_per_cpu_s"]) if r["records_per_cpu_s"] else "—"


def _envs(m: dict[str, Any]) -> str:
    if not m.get("environments"):
        return "—"
    return f"{m['environments']} x ≤{m['environment_hwm_mb']:.0f}"


def _table(head: list[str], right: int, lines: list[list[str]]) -> str:
    """A Markdown table; the columns from `right` on are numbers (right-aligned)."""
    align = ["---" if i < right else "---:" for i in range(len(head))]
    out = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    out += ["| " + " | ".join(cells) + " |" for cells in lines]
    return "\n".join(out) + "\n"


def _failed_line(r: dict[str, Any], width: int, lead: int) -> list[str]:
    cells = [r["broker"], r["label"], r["isolation"]][:lead]
    return cells + [f"failed: {r['error'][:80]}"] + [""] * (width - lead - 1)


def markdown(run: dict[str, Any]) -> str:
    rows = run["rows"]
    host = run["host"]
    s = run["settings"]
    load = ", ".join(f"{x:.1f}" for x in host.get("load_average", []))
    out = [
        f"# Scaling run {run['started']}{' (quick)' if s['quick'] else ''}\n",
        f"{host['cpus']} CPUs, Python {host['python']}, load average at the end {load};"
        f" {run['duration_s']:.0f} s in all. `workers run` with {s['mapping']}. Records/s run"
        " from the first invocation's start to the last one's end; every run checked that"
        " each record produced was handled. Cores: CPU time of the whole `workers run` tree"
        " (the pollers' share in brackets) over that span, from /proc every 0.1 s, the"
        " broker's (the shared Redis server serves other work too), and the cores the whole"
        " machine kept busy meanwhile;"
        " records/CPU-s divides the records by that CPU time, which the machine's other load"
        " disturbs less than records/s. The broker runs on the same cores. Memory: peak"
        " resident set (VmHWM) per process, and the proportional set size (PSS) of the whole"
        " tree at its peak, which counts pages the environments share with each other once.\n",
    ]

    size = _section(rows, "size")
    if size:
        head = [
            "broker",
            "value",
            "isolation",
            "records",
            "records/s",
            "MB/s",
            "cores: run (pollers) + broker of busy",
            "records/CPU-s",
            "records/invocation",
            "ms/invocation",
            "poller MB",
            "environments x MB",
            "tree PSS MB",
        ]
        lines = []
        for r in size:
            if _failed(r):
                lines.append(_failed_line(r, len(head), 3))
                continue
            m = r["memory"]
            lines.append(
                [
                    r["broker"],
                    r["label"],
                    r["isolation"],
                    _n(r["records"]),
                    _n(r["rate"]),
                    _n(r["mb_per_s"], 1),
                    _cores(r),
                    _per_cpu(r),
                    _n(r["records_per_invocation"], 1),
                    _n(r["ms_per_invocation"], 1),
                    _n(m["poller_hwm_mb"]),
                    _envs(m),
                    _n(m["tree_peak_pss_mb"]),
                ]
            )
        out += [
            "## Record size\n",
            "One partition or stream, batch_size 500, concurrency 4. ms/invocation is the"
            " measured time over the invocations (one lane: the time each batch takes).\n",
            _table(head, 3, lines),
        ]

    parts = _section(rows, "partitions")
    if parts:
        head = [
            "broker",
            "partitions/streams",
            "isolation",
            "records",
            "records/s",
            "ratio to 1",
            "cores: run (pollers) + broker of busy",
            "records/CPU-s",
            "records/invocation",
            "poller threads",
            "poller MB",
            "environments x MB",
            "topic created in s",
        ]
        lines = []
        for r in parts:
            if _failed(r):
                lines.append(_failed_line(r, len(head), 3))
                continue
            m = r["memory"]
            create = f"{r['create_s']:.3f}" if r["broker"] == "kafka" else "—"
            lines.append(
                [
                    r["broker"],
                    r["label"],
                    r["isolation"],
                    _n(r["records"]),
                    _n(r["rate"]),
                    _ratio(r["rate"], _base(rows, r, section="partitions", units=1)),
                    _cores(r),
                    _per_cpu(r),
                    _n(r["records_per_invocation"], 1),
                    str(m["poller_threads"]),
                    _n(m["poller_hwm_mb"]),
                    _envs(m),
                    create,
                ]
            )
        out += [
            "## Partitions (Kafka) or streams (Redis) per poller\n",
            "The same record count spread evenly, 100-byte values, one poller, concurrency 4."
            " Poller threads: the most seen at once in the poller process.\n",
            _table(head, 3, lines),
        ]

    lanes = _section(rows, "lanes")
    if lanes:
        head = [
            "broker",
            "parallelization_factor",
            "isolation",
            "records",
            "records/s",
            "ratio to pf=1",
            "cores: run (pollers) + broker of busy",
            "records/CPU-s",
            "records/invocation",
            "poller threads",
            "poller MB",
            "environments x MB",
            "tree PSS MB",
        ]
        lines = []
        for r in lanes:
            if _failed(r):
                lines.append(_failed_line(r, len(head), 3))
                continue
            m = r["memory"]
            lines.append(
                [
                    r["broker"],
                    str(r["parallelization_factor"]),
                    r["isolation"],
                    _n(r["records"]),
                    _n(r["rate"]),
                    _ratio(r["rate"], _base(rows, r, section="lanes", parallelization_factor=1)),
                    _cores(r),
                    _per_cpu(r),
                    _n(r["records_per_invocation"], 1),
                    str(m["poller_threads"]),
                    _n(m["poller_hwm_mb"]),
                    _envs(m),
                    _n(m["tree_peak_pss_mb"]),
                ]
            )
        out += [
            "## parallelization_factor on one partition or stream\n",
            "100-byte values, 1,000 keys, concurrency = parallelization_factor, so every lane"
            " can run at once."
            " With a no-op handler this is the cost of lanes, not their benefit (bench's"
            " io-bound rows show the benefit).\n",
            _table(head, 3, lines),
        ]

    pollers = _section(rows, "pollers")
    if pollers:
        head = [
            "broker",
            "pollers",
            "isolation",
            "records",
            "records/s",
            "ratio to 1 poller",
            "runs (records/s)",
            "cores: run (pollers) + broker of busy",
            "records/CPU-s",
            "poller MB (each)",
            "environments x MB",
            "tree PSS MB",
        ]
        lines = []
        for r in pollers:
            if _failed(r):
                lines.append(_failed_line(r, len(head), 3))
                continue
            m = r["memory"]
            lines.append(
                [
                    r["broker"],
                    str(r["pollers"]),
                    r["isolation"],
                    _n(r["records"]),
                    _n(r["rate"]),
                    _ratio(r["rate"], _base(rows, r, section="pollers", pollers=1)),
                    ", ".join(_n(x) for x in r["runs"]) or _n(r["rate"]),
                    _cores(r),
                    _per_cpu(r),
                    _n(m["poller_hwm_mb"]),
                    _envs(m),
                    _n(m["tree_peak_pss_mb"]),
                ]
            )
        units = pollers[0]["units"]
        out += [
            "## Pollers on one machine\n",
            f"{units} partitions (Kafka) or streams (Redis), one consumer group, 100-byte"
            " values, concurrency 4 per poller; 1 and 2 pollers interleaved, each row the run"
            " of median records/s. A second poller can only use a core the machine has free:"
            " compare the busy cores.\n",
            _table(head, 3, lines),
        ]
    if run.get("errors"):
        out.append("Errors:\n\n" + "".join(f"- {e}\n" for e in run["errors"]))
    return "\n".join(out)


def chart(run: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in run["rows"] if not _failed(r)]
    brokers = list(dict.fromkeys(r["broker"] for r in rows))
    quick = " (quick)" if run["settings"]["quick"] else ""
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    fig.suptitle(
        f"esm-workers scaling {run['started']}{quick}, {run['host']['cpus']} CPUs, no-op handler"
    )

    ax = axes[0][0]
    for broker in brokers:
        for isolation in ("thread", "process"):
            points = sorted(
                (r["value_bytes"], r["mb_per_s"])
                for r in _section(rows, "size")
                if r["broker"] == broker and r["isolation"] == isolation
            )
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o", label=f"{broker} {isolation}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("value bytes (log)")
    ax.set_ylabel("MB/s of values (log)")
    ax.set_title("Record size: throughput")
    _legend(ax)

    ax = axes[0][1]
    right = ax.twinx()
    for broker in brokers:
        spread = sorted(
            (r["units"], r["rate"], r["memory"]["poller_threads"])
            for r in _section(rows, "partitions")
            if r["broker"] == broker
        )
        if spread:
            xs, rates, threads = zip(*spread, strict=True)
            ax.plot(xs, rates, marker="o", label=f"{broker} records/s")
            right.plot(xs, threads, marker="x", linestyle="--", label=f"{broker} poller threads")
    ax.set_xscale("log")
    ax.set_xlabel("partitions (Kafka) / streams (Redis) per poller (log)")
    ax.set_ylabel("records/s")
    right.set_ylabel("poller threads (dashed)")
    right.set_ylim(bottom=0)
    ax.set_title("Partitions per poller")
    handles = ax.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    if handles[0]:
        ax.legend(handles[0] + more[0], handles[1] + more[1], fontsize=8)

    ax = axes[1][0]
    for broker in brokers:
        for isolation in ("thread", "process"):
            size = sorted(
                (
                    (r["value_bytes"], r["memory"])
                    for r in _section(rows, "size")
                    if r["broker"] == broker and r["isolation"] == isolation
                ),
                key=lambda point: point[0],
            )
            if size:
                sizes = [x for x, _ in size]
                ax.plot(
                    sizes,
                    [m["poller_hwm_mb"] for _, m in size],
                    marker="o",
                    label=f"{broker} {isolation}: poller",
                )
                if isolation == "process":
                    ax.plot(
                        sizes,
                        [m["environment_hwm_mb"] for _, m in size],
                        marker="s",
                        linestyle="--",
                        label=f"{broker} process: environment",
                    )
    ax.set_xscale("log")
    ax.set_xlabel("value bytes (log)")
    ax.set_ylabel("peak RSS, MB")
    ax.set_ylim(bottom=0)
    ax.set_title("Record size: memory (batch 500, at most 6 MiB per invocation)")
    _legend(ax)

    ax = axes[1][1]
    labels: list[str] = []
    values: list[float] = []
    colours: list[str] = []
    palette = {"kafka": "tab:blue", "redis": "tab:orange"}
    for broker in brokers:
        for r in _section(rows, "lanes") + _section(rows, "pollers"):
            if r["broker"] != broker:
                continue
            if r["section"] == "lanes":
                base = _base(rows, r, section="lanes", parallelization_factor=1)
                labels.append(f"{broker} pf={r['parallelization_factor']}")
            else:
                base = _base(rows, r, section="pollers", pollers=1)
                labels.append(f"{broker} {r['isolation']} pollers={r['pollers']}")
            values.append(r["rate"] / base if base else 0.0)
            colours.append(palette.get(broker, "tab:grey"))
    ax.bar(range(len(values)), values, color=colours)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=45, ha="right")
    ax.set_ylabel("records/s relative to pf=1 / pollers=1")
    ax.set_title("Lanes on one partition (no-op handler), pollers on 8 partitions")

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _legend(ax: Any) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def main() -> None:
    run = json.loads((RESULTS / "scaling.json").read_text())
    (RESULTS / "scaling.md").write_text(markdown(run))
    chart(run, RESULTS / "scaling.png")


if __name__ == "__main__":
    main()
