"""What `tsotsa eval compare` writes: results.json (everything measured), results.md (two tables: the tasks'
metrics with their standard errors; latency, throughput and memory), and two PNG plots (each task's main
metric against memory per block; latency per token and time to first token per variant)."""

from __future__ import annotations

import json
import math
from pathlib import Path

MIB = 1 << 20
FILES = ("results.json", "results.md", "accuracy_vs_memory.png", "latency.png")


def task_metrics(results: dict) -> dict[str, dict[str, dict]]:
    """lm-eval's `results["results"]` as {task: {metric: {"value", "stderr"}}} (lm-eval's "METRIC,FILTER"
    keys, the filter dropped where it is lm-eval's "none"; stderr None where lm-eval has none, e.g. for
    perplexities)."""
    table: dict[str, dict[str, dict]] = {}
    for task, values in results.items():
        metrics: dict[str, dict] = {}
        for key, value in values.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = values.get(f"{metric}_stderr,{filter_name}")
            name = metric if filter_name == "none" else f"{metric} ({filter_name})"
            metrics[name] = {"value": float(value),
                             "stderr": float(stderr) if isinstance(stderr, (int, float)) else None}
        table[task] = metrics
    return table


def write_report(comparison: dict, directory: Path) -> list[Path]:
    """Writes the four files into `directory` (made if missing); returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / name for name in FILES]
    paths[0].write_text(json.dumps(comparison, indent=2, default=str) + "\n")
    paths[1].write_text(markdown(comparison))
    plot_accuracy(comparison, paths[2])
    plot_latency(comparison, paths[3])
    return paths


def _columns(comparison: dict) -> list[tuple[str, str]]:
    """(task, metric) pairs in the order the first variant reports them, then any only later ones have."""
    columns: list[tuple[str, str]] = []
    for row in comparison["variants"]:
        for task, metrics in row["metrics"].items():
            columns += [(task, metric) for metric in metrics if (task, metric) not in columns]
    return columns


def _number(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if abs(value) >= 1e6:
        return f"{value:.4g}"
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.{digits}f}"


def _size(value: int | None) -> str:
    """Bytes in the largest unit that leaves at least 1 (KiB, MiB, GiB)."""
    if not value:
        return "–"
    for unit, scale in (("GiB", 1 << 30), ("MiB", MIB), ("KiB", 1 << 10)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value} B"


def _backend(row: dict) -> str:
    if row["backend"] == "transformers":
        return "transformers (1 process)"
    return f"swarm ({len(row['peers'])} peers)"


def markdown(comparison: dict) -> str:
    machine, protocol = comparison["machine"], comparison["protocol"]
    latency = protocol["latency"]
    libraries = ", ".join(f"{name} {version}" for name, version in machine["libraries"].items() if version)
    lines = ["# tsotsa eval compare", "",
             f"**Machine**: {machine['cpu']}, {machine['physical_cores']} cores ({machine['logical_cores']} logical), "
             f"{machine['memory_bytes'] / (1 << 30):.1f} GiB; GPU: {', '.join(machine['gpus']) or 'none'}; device "
             f"{machine['device']}; {machine['threads_per_process']} torch threads per process "
             f"(each peer, and the transformers process); {machine['os']}, Python {machine['python']}.", "",
             f"**Libraries**: {libraries}.", "",
             f"**Tasks**: {', '.join(protocol['tasks'])} (lm-eval; limit {protocol['limit'] or 'none'}, few-shot "
             f"{'the tasks’ own' if protocol['num_fewshot'] is None else protocol['num_fewshot']}, batch "
             f"{protocol['batch_size']}); swarm variants on {protocol['peers_per_variant']} peers started on this "
             "machine unless the variant is `swarm`.", "",
             f"**Latency protocol**: {latency['warmup']} warm-up run(s) of each phase, then {latency['repeats']} "
             f"greedy generations of {latency['new_tokens']} tokens one at a time (time to first token, gaps "
             f"between tokens, tokens/s per stream) and {latency['repeats']} rounds of {latency['concurrency']} requests at once "
             "(tokens/s and requests/s of each round; the swarm gets them as concurrent requests, transformers as "
             f"one batch), over {len(latency['prompts'])} prompts in turn. Figures are medians unless said; p99 over "
             "all token gaps.", "", "## Accuracy", ""]
    columns = _columns(comparison)
    headers = " | ".join(f"{task} {metric}" for task, metric in columns)
    lines.append(f"| variant | backend | dtype / quant | {headers} |")
    lines.append("|" + "---|" * (3 + len(columns)))
    for row in comparison["variants"]:
        cells = []
        for task, metric in columns:
            entry = row["metrics"].get(task, {}).get(metric)
            if entry is None:
                cells.append("–")
            else:
                stderr = "" if entry["stderr"] is None else f" ± {_number(entry['stderr'])}"
                cells.append(_number(entry["value"]) + stderr)
        lines.append(f"| {row['variant']} | {_backend(row)} | {row['dtype']} / {row['quant']} | {' | '.join(cells)} |")
    lines += ["", "## Latency, throughput, memory", "",
              "| variant | bytes per block | peak RSS per peer | ms per token p50 | ms per token p99 | "
              "ms per token mean | TTFT ms | tok/s (1 stream) | tok/s "
              f"({latency['concurrency']} at once) | req/s ({latency['concurrency']} at once) |",
              "|" + "---|" * 10]
    for row in comparison["variants"]:
        figures = row["latency"]
        lines.append(" | ".join([
            f"| {row['variant']}", _size(row["bytes_per_block"]), _size(row["peak_rss_bytes"]),
            _number(figures["token_ms"]["median"], 2), _number(figures["token_ms"]["p99"], 2),
            _number(figures["token_ms"]["mean"], 2), _number(figures["ttft_ms"]["median"], 1),
            _number(figures["tokens_per_s"]["median"], 1), _number(figures["throughput_tokens_per_s"]["median"], 1),
            _number(figures["requests_per_s"]["median"], 2)]) + " |")
    current = [row["variant"] for row in comparison["variants"]
               if any(peer.get("rss_measured") == "current" for peer in row["peers"])]
    if current:
        lines += ["", f"RSS of {', '.join(current)}: the peers' current resident memory (they are not this "
                  "machine's processes, so their peak is not known here)."]
    return "\n".join(lines) + "\n"


def _main_metric(metrics: dict[str, dict]) -> str | None:
    """The metric a task's plot shows: accuracy first, then exact match, then perplexity, else the first."""
    for wanted in ("acc", "exact_match", "word_perplexity"):
        if wanted in metrics:
            return wanted
    return next(iter(metrics), None)


def _pyplot():
    """matplotlib's pyplot on the Agg backend: PNGs without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(comparison: dict, path: Path) -> None:
    """One panel per task: its main metric (with the standard error) against MiB per block, per variant."""
    plt = _pyplot()
    rows = comparison["variants"]
    tasks = list(dict.fromkeys(task for row in rows for task in row["metrics"]))
    figure, axes = plt.subplots(1, max(len(tasks), 1), figsize=(5.5 * max(len(tasks), 1), 4.2), squeeze=False)
    for axis, task in zip(axes[0], tasks):
        metric = _main_metric(next(row["metrics"][task] for row in rows if task in row["metrics"]))
        labels: dict[tuple[float, float], list[str]] = {}  # variants on the same point share one label
        for row in rows:
            entry = row["metrics"].get(task, {}).get(metric)
            if entry is None or not row["bytes_per_block"]:
                continue
            x = row["bytes_per_block"] / MIB
            axis.errorbar([x], [entry["value"]], yerr=[entry["stderr"] or 0.0], fmt="o", capsize=4)
            labels.setdefault((round(x, 2), float(f"{entry['value']:.4g}")), []).append(row["variant"])
        for (x, y), names in labels.items():
            axis.annotate(", ".join(names), (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
        axis.margins(x=0.25, y=0.12)  # room for the labels beside the points
        axis.set_xlabel("MiB per block")
        axis.set_ylabel(metric or "")
        axis.set_title(task)
        axis.grid(alpha=0.3)
    figure.suptitle("accuracy against memory per block")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_latency(comparison: dict, path: Path) -> None:
    """Per variant: latency per token (median and p99) and time to first token (median), in ms."""
    plt = _pyplot()
    rows = comparison["variants"]
    names = [row["variant"] for row in rows]
    series = [("per token p50", lambda f: f["token_ms"]["median"]), ("per token p99", lambda f: f["token_ms"]["p99"]),
              ("first token (median)", lambda f: f["ttft_ms"]["median"])]
    figure, axis = plt.subplots(figsize=(max(6.0, 1.6 * len(rows) + 2), 4.2))
    width = 0.8 / len(series)
    for index, (label, value) in enumerate(series):
        positions = [i + (index - (len(series) - 1) / 2) * width for i in range(len(rows))]
        axis.bar(positions, [value(row["latency"]) for row in rows], width, label=label)
    axis.set_xticks(range(len(rows)), names, rotation=20, ha="right")
    axis.set_ylabel("ms")
    axis.set_title("latency per variant")
    axis.margins(y=0.3)  # the legend above the bars
    axis.legend(loc="upper left", fontsize=8)
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
