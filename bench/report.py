"""Writes a benchmark run: JSON (one file per run plus latest.json), a Markdown table
(latest.md) and a chart (latest.png)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from bench.common import RESULTS

THROUGHPUT = ("raw", "raw-event", "engine-thread", "engine-process", "faststream")
LABELS = {
    "raw": "raw client loop",
    "raw-event": "raw loop + Lambda's event",
    "engine-thread": "esm-workers (thread)",
    "engine-process": "esm-workers (process)",
    "faststream": "FastStream",
}


def write(run: dict[str, Any], folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    stamp = run["started"].replace(":", "").replace("-", "")[:15]
    run_path = folder / f"run-{stamp}.json"
    run_path.write_text(json.dumps(run, indent=2) + "\n")
    latest = folder / "latest.json"
    shutil.copyfile(run_path, latest)
    md = folder / "latest.md"
    md.write_text(markdown(run))
    png = folder / "latest.png"
    chart(run, png)
    return {"run": run_path, "json": latest, "md": md, "png": png}


def _rate(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f}"


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| broker | measurement | records/s | ratio to raw | notes |",
        "|---|---|---:|---:|---|",
    ]
    for row in rows:
        name = LABELS.get(row["measurement"], row["measurement"])
        lines.append(
            f"| {row['broker']} | {name} | {_rate(row['rate'])} | {_ratio(row['ratio'])}"
            f" | {_cell(row['notes'])} |"
        )
    return "\n".join(lines) + "\n"


def markdown(run: dict[str, Any]) -> str:
    s = run["settings"]
    head = (
        f"# Benchmark run {run['started']}\n\n"
        f"{run['host']['cpus']} CPUs, Python {run['host']['python']},"
        f" {run['duration_s']:.0f} s in all. Records per broker: "
        + ", ".join(f"{b} {n:,}" for b, n in s["records"].items())
        + f"; medians of {s['repeats']} runs. Ratios compare with the raw client loop of the"
        " same broker in the same run.\n\n"
    )
    body = table(run["rows"])
    if run.get("skipped"):
        body += "\nNot measured:\n\n" + "".join(f"- {e}\n" for e in run["skipped"])
    if run.get("errors"):
        body += "\nErrors:\n\n" + "".join(f"- {e}\n" for e in run["errors"])
    return head + body


def chart(run: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = run["rows"]
    brokers = list(dict.fromkeys(r["broker"] for r in rows))
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    fig.suptitle(f"esm-workers benchmark {run['started']} ({run['host']['cpus']} CPUs)")

    ax = axes[0][0]
    width = 0.8 / len(THROUGHPUT)
    for i, kind in enumerate(THROUGHPUT):
        xs, ys, ratios = [], [], []
        for j, broker in enumerate(brokers):
            row = _find(rows, broker, kind)
            if row and row["rate"]:
                xs.append(j + (i - (len(THROUGHPUT) - 1) / 2) * width)
                ys.append(row["rate"])
                ratios.append(row["ratio"])
        if not ys:
            continue  # not measured on any broker here: no legend entry either
        bars = ax.bar(xs, ys, width, label=LABELS[kind])
        for bar, ratio in zip(bars, ratios, strict=True):
            if ratio is not None and kind != "raw":
                ax.annotate(
                    f"{ratio:.0%}",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
    ax.set_xticks(range(len(brokers)), brokers)
    if ax.containers:  # a log scale with no bar at all (every run failed) cannot be drawn
        ax.set_yscale("log")
    ax.set_ylabel("records/s (log scale)")
    ax.set_title("No-op handler, batch 500 (label: share of raw)")
    _legend(ax)

    ax = axes[0][1]
    for broker in brokers:
        points = [
            (int(r["measurement"].split("=")[1]), r["rate"])
            for r in rows
            if r["broker"] == broker and r["measurement"].startswith("io-bound pf=") and r["rate"]
        ]
        if points:
            ax.plot(*zip(*sorted(points), strict=True), marker="o", label=broker)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("parallelization_factor")
    ax.set_ylabel("records/s")
    ax.set_title("I/O-bound handler (2 ms/record), one partition/stream/queue")
    _legend(ax)

    ax = axes[1][0]
    names, p50s, p99s = [], [], []
    for broker in brokers:
        row = _find(rows, broker, "latency")
        if row and row["extra"].get("p50_ms") is not None:
            names.append(broker)
            p50s.append(row["extra"]["p50_ms"])
            p99s.append(row["extra"]["p99_ms"])
    xs = list(range(len(names)))
    ax.bar([x - 0.2 for x in xs], p50s, 0.4, label="p50")
    ax.bar([x + 0.2 for x in xs], p99s, 0.4, label="p99")
    ax.set_xticks(xs, names)
    ax.set_ylabel("ms, produce to handler start")
    ax.set_title("Latency at 1,000 records/s (window 0, process isolation)")
    _legend(ax)

    ax = axes[1][1]
    names, clean, work, backoff = [], [], [], []
    for broker in brokers:
        c = _starting(rows, broker, "bisect clean")
        p = _starting(rows, broker, "bisect poison")
        if c and p and c["extra"].get("wall_s") and p["extra"].get("wall_s"):
            names.append(broker)
            clean.append(_median(c["extra"]["wall_s"]) * 1000)
            wall = _median(p["extra"]["wall_s"]) * 1000
            waited = _median(p["extra"].get("retry_backoff_s") or [0.0]) * 1000
            work.append(wall - waited)
            backoff.append(waited)
    xs = list(range(len(names)))
    ax.bar([x - 0.2 for x in xs], clean, 0.4, label="clean batch")
    ax.bar([x + 0.2 for x in xs], work, 0.4, label="poison: bisecting")
    ax.bar([x + 0.2 for x in xs], backoff, 0.4, bottom=work, label="poison: retry backoff")
    ax.set_xticks(xs, names)
    ax.set_ylabel("ms, first invocation's start to last one's end")
    ax.set_title("Bisect: one poison record in 1,000, maximum_retry_attempts 2")
    _legend(ax)

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _legend(ax: Any) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def _find(rows: list[dict[str, Any]], broker: str, measurement: str) -> dict[str, Any] | None:
    return next(
        (r for r in rows if r["broker"] == broker and r["measurement"] == measurement), None
    )


def _starting(rows: list[dict[str, Any]], broker: str, prefix: str) -> dict[str, Any] | None:
    return next(
        (r for r in rows if r["broker"] == broker and r["measurement"].startswith(prefix)), None
    )


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else 0.0


def main() -> None:
    """Re-render latest.md and latest.png from latest.json (after changing this module)."""
    run = json.loads((RESULTS / "latest.json").read_text())
    (RESULTS / "latest.md").write_text(markdown(run))
    chart(run, RESULTS / "latest.png")


if __name__ == "__main__":
    main()
