"""Charts of benchmark results: a PNG beside each result file whose table is a curve.

    python benchmarks/plots.py [FILES...]

With no arguments, every JSON file under ``benchmarks/results/`` (subfolders included);
prints each PNG written. A chart lands next to its file with the same stem
(``server_vs_vllm_1.5b.json`` -> ``server_vs_vllm_1.5b.png``); a second chart from one
file gets a suffix (``server_vs_vllm_3b_seed_table.png``). Result files are recognised
by their content:

- lylm's server against ``vllm serve`` (``server_vs_vllm.py``), two instances against one
  (``two_instances.py``), the collector's pauses (``gc_pauses.py``): throughput and TTFT
  against concurrency, one line per side;
- a load generator's grid (``seed_table.py``, ``frontend_ceiling.py``, and the seed table
  inside a ``server_vs_vllm.py --seed-table`` file): throughput and TTFT percentiles;
- lylm ``--workers`` against ``vllm serve --api-server-count`` (``workers_vs_vllm.py``);
- the front end's ceiling over worker counts (``worker_ceiling.py``);
- one engine core with 1, 2, 4 front-end processes (``engine_clients.py``).

Other results (single numbers, bar-shaped comparisons) are skipped. Lines are medians over
rounds, dots single rounds. Needs matplotlib (``pip install matplotlib``); importing this
module does not.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
TOK_S = "output tokens/s"
STREAMS = "concurrent requests (streams)"
ARM_LABELS = {
    "lylm": "lylm server",
    "vllm": "vllm serve",
    "lylm_frozen": "lylm server, gc.freeze()",
    "one": "one engine",
    "two": "two engines on the GPU",
}
ARM_COLORS = {"lylm": "C0", "vllm": "C1", "lylm_frozen": "C2", "one": "C1", "two": "C0"}
PERCENTILE_STYLES = {"p50": ("-", "o"), "p90": ("-.", "D"), "p99": ("--", "^")}

Doc = dict[str, Any]


@dataclass
class Series:
    """One line: medians at each x, and optionally the single rounds behind each median."""

    label: str
    xs: list[float]
    ys: list[float]
    rounds: list[list[float]] = field(default_factory=list)
    color: str = "C0"
    linestyle: str = "-"
    marker: str = "o"
    width: float = 1.8


@dataclass
class Panel:
    """One set of axes; ``log_y`` asks for a log scale where the values span a decade or more."""

    ylabel: str
    series: list[Series]
    log_y: bool = False

    def spans_decades(self) -> bool:
        values = [y for s in self.series for y in s.ys if y > 0]
        return bool(values) and max(values) >= 10 * min(values)


@dataclass
class Chart:
    """What one PNG shows; ``suffix`` is appended to the result file's stem."""

    title: str
    xlabel: str
    panels: list[Panel]
    suffix: str = ""


def _pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("benchmarks/plots.py draws with matplotlib: pip install matplotlib") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# --- where a result came from: model, device, commit -------------------------------------


def _model(doc: Doc, default: str) -> str:
    config = doc.get("config") or {}
    if config.get("shape"):  # a GPU run: the shape of a published model, dummy weights
        name = re.sub(r"(\d)b$", r"\1B", str(config["shape"])).replace("qwen", "Qwen")
        return f"{name} shape"
    if config.get("model_dir"):
        return re.sub(r"(\d)b$", r"\1B", Path(config["model_dir"]).name) + " model"
    return str(config.get("model") or default)


def _device(doc: Doc) -> str:
    machine = doc.get("machine") or {}
    gpus = [line.split(", ")[1] for line in machine.get("gpus") or [] if ", " in line]
    if gpus:
        where = f"one {gpus[0]}" if len(gpus) == 1 else f"{len(gpus)} x {gpus[0]}"
    else:
        cpu = str(machine.get("cpu") or "").replace("(R)", "").replace(" Processor", "")
        where = f"{machine.get('cpu_count', '?')} CPU cores" + (f" ({cpu})" if cpu else "")
    return where + (f", vLLM {machine['vllm']}" if machine.get("vllm") else "")


def _title(doc: Doc, what: str, model: str) -> str:
    context = [_model(doc, model), _device(doc)]
    if doc.get("commit"):
        context.append(f"commit {str(doc['commit'])[:7]}")
    return f"{what}\n{', '.join(part for part in context if part)}"


def _over_rounds(count: int) -> str:
    return "one round" if count == 1 else f"medians of {count} rounds"


# --- the kinds of result file ---------------------------------------------------------


def _arms_chart(doc: Doc, what: str, model: str, percentiles: Sequence[str]) -> Chart:
    """Rows of one concurrency each, with ``<arm>_<metric>`` medians and ``rounds[arm]`` runs."""
    rows = doc["rows"]
    xs = [row["concurrency"] for row in rows]
    throughput, ttft = [], []
    for arm in rows[0]["rounds"]:
        label, color = _arm_label(doc, arm), ARM_COLORS.get(arm, "C3")
        key = f"{arm}_tok_s" if f"{arm}_tok_s" in rows[0] else f"{arm}_system_tokens_per_s"
        runs = [row["rounds"][arm] for row in rows]
        rounds = [[r["system_tokens_per_s"] for r in rs] for rs in runs]
        throughput.append(Series(label, xs, [row[key] for row in rows], rounds, color))
        for p in percentiles:
            metric = f"ttft_{p}_ms"
            rounds = [[r[metric] for r in rs] for rs in runs]
            ys = [row[f"{arm}_{metric}"] for row in rows]
            ttft.append(Series(f"{label}, {p}", xs, ys, rounds, color, *PERCENTILE_STYLES[p]))
    done = doc.get("rounds_done") or max(len(runs) for runs in rows[0]["rounds"].values())
    title = _title(doc, f"{what}: {_over_rounds(done)}", model)
    ttft_label = f"TTFT {' and '.join(percentiles)}, ms"
    return Chart(title, STREAMS, [Panel(TOK_S, throughput), Panel(ttft_label, ttft, log_y=True)])


def _arm_label(doc: Doc, arm: str) -> str:
    workers = (doc.get("config") or {}).get("workers")
    if arm == "lylm" and workers:
        return f"lylm server, {workers} worker{'s' if workers > 1 else ''}"
    return ARM_LABELS.get(arm, arm)


def _grid_chart(cells: Sequence[Doc], title: str, suffix: str = "") -> Chart:
    """A load generator's grid (``loadgen.write_results`` cells): one run per concurrency."""
    xs = [cell["concurrency"] for cell in cells]
    throughput = [Series("lylm server, all streams together", xs, [cell["system_tokens_per_s"] for cell in cells])]
    ttft = [
        Series(p, xs, [cell[f"ttft_{p}_ms"] for cell in cells], [], f"C{i}", *style)
        for i, (p, style) in enumerate(PERCENTILE_STYLES.items())
    ]
    return Chart(title, STREAMS, [Panel(TOK_S, throughput), Panel("TTFT, ms", ttft, log_y=True)], suffix)


def _server_vs_vllm(doc: Doc, path: Path) -> list[Chart]:
    rows = doc.get("rows") or []
    if not rows or "lylm_tok_s" not in rows[0] or "vllm_tok_s" not in rows[0]:
        return []
    charts = [_arms_chart(doc, "lylm's server vs vllm serve", "tiny model", ["p50"])]
    if doc.get("seed_table"):
        title = _title(doc, "the seed's grid through lylm's server (chat completions)", "")
        charts.append(_grid_chart(doc["seed_table"], title, "_seed_table"))
    return charts


def _two_instances(doc: Doc, path: Path) -> list[Chart]:
    rows = doc.get("rows") or []
    if not rows or "one_system_tokens_per_s" not in rows[0]:
        return []
    weights = ":".join(f"{engine['weight']:g}" for engine in doc.get("engines_at_end") or [])
    what = "one engine vs two sharing one GPU" + (f" (weights {weights})" if weights else "")
    return [_arms_chart(doc, what, "", ["p50", "p99"])]


def _gc_pauses(doc: Doc, path: Path) -> list[Chart]:
    rows = doc.get("rows") or []
    if not rows or "lylm_frozen_system_tokens_per_s" not in rows[0]:
        return []
    return [_arms_chart(doc, "full garbage collections: lylm, lylm with gc.freeze(), vllm serve", "", ["p50", "p99"])]


def _loadgen_grid(doc: Doc, path: Path) -> list[Chart]:
    cells = doc.get("cells") or []
    if not cells or "system_tokens_per_s" not in cells[0]:
        return []
    if path.stem.startswith("frontend_ceiling"):
        what, model = "front-end ceiling: lylm's server over zero-latency FakeEngines", "FakeEngines"
    else:
        what, model = "the seed's grid through lylm's server", "tiny model"
    return [_grid_chart(cells, _title(doc, what, model))]


def _workers_vs_vllm(doc: Doc, path: Path) -> list[Chart]:
    rows = doc.get("rows") or []
    if not rows or "server" not in rows[0] or "tok_s_all" not in rows[0]:
        return []
    throughput, ttft = [], []
    for server in dict.fromkeys(row["server"] for row in rows):
        mine = [row for row in rows if row["server"] == server]
        xs = [row["concurrency"] for row in mine]
        label, color, style, marker = _server_style(server)
        rounds = [row["tok_s_all"] for row in mine]
        throughput.append(Series(label, xs, [row["tok_s"] for row in mine], rounds, color, style, marker))
        ttft.append(Series(label, xs, [row["ttft_p50_ms"] for row in mine], [], color, style, marker))
    done = doc.get("rounds_done") or max(row["rounds"] for row in rows)
    what = f"lylm --workers vs vllm serve --api-server-count, one engine: {_over_rounds(done)}"
    panels = [Panel(TOK_S, throughput), Panel("TTFT p50, ms", ttft, log_y=True)]
    return [Chart(_title(doc, what, ""), STREAMS, panels)]


def _server_style(server: str) -> tuple[str, str, str, str]:
    """Label, colour, line style and marker of a ``lylmx4`` / ``vllmx4`` arm."""
    match = re.fullmatch(r"(lylm|vllm)x(\d+)", server)
    if not match:
        return server, "C3", "-", "o"
    kind, count = match[1], int(match[2])
    label = f"lylm --workers {count}" if kind == "lylm" else f"vllm serve --api-server-count {count}"
    style, marker = {1: (":", "v"), 2: ("--", "s")}.get(count, ("-", "o"))
    return label, ARM_COLORS[kind], style, marker


def _worker_ceiling(doc: Doc, path: Path) -> list[Chart]:
    rows = doc.get("rows") or []
    if not rows or "workers" not in rows[0] or "tok_s_all" not in rows[0]:
        return []
    xs = [row["workers"] for row in rows]
    throughput = [Series("lylm server", xs, [row["tok_s"] for row in rows], [row["tok_s_all"] for row in rows])]
    cpu = [
        Series("server (all processes)", xs, [row["server_cores"] for row in rows], color="C0"),
        Series("busiest client process", xs, [row["client_cpu_share_max"] for row in rows], color="C1", marker="s"),
    ]
    settings = doc.get("settings") or {}
    what = (
        f"front-end ceiling: lylm's server with W workers over {settings.get('engines', '?')} zero-latency "
        f"FakeEngines, {settings.get('streams', '?')} streams"
    )
    panels = [Panel("streamed tokens/s", throughput), Panel("CPU, cores", cpu)]
    return [Chart(_title(doc, what, "FakeEngines"), "front-end workers (W)", panels)]


def _engine_clients(doc: Doc, path: Path) -> list[Chart]:
    rows = doc.get("rows") or []
    if not doc.get("samples") or not rows or "clients" not in rows[0]:
        return []
    xs = [row["clients"] for row in rows]
    by_round: dict[int, dict[int, Doc]] = {}
    for sample in doc["samples"]:
        by_round.setdefault(sample["round"], {})[sample["clients"]] = sample
    throughput, cpu = [], []
    for i, (n, samples) in enumerate(sorted(by_round.items())):
        tok_s = [samples[x]["tok_s"] for x in xs]
        busiest = [max(samples[x]["client_cpu_share"]) for x in xs]
        throughput.append(Series(f"round {n + 1}", xs, tok_s, color=f"C{i + 1}", marker="s", width=1.0))
        cpu.append(Series(f"round {n + 1}", xs, busiest, color=f"C{i + 1}", marker="s", width=1.0))
    throughput.append(Series("median", xs, [row["tok_s"] for row in rows], color="k", width=2.5))
    config = doc.get("config") or {}
    what = f"one engine core, k front-end processes (AsyncLLM clients), {config.get('streams', '?')} streams, no HTTP"
    panels = [Panel(TOK_S, throughput), Panel("busiest client process, share of a core", cpu)]
    return [Chart(_title(doc, what, ""), "front-end processes (k)", panels)]


KINDS: list[Callable[[Doc, Path], list[Chart]]] = [
    _server_vs_vllm,
    _two_instances,
    _gc_pauses,
    _loadgen_grid,
    _workers_vs_vllm,
    _worker_ceiling,
    _engine_clients,
]


# --- drawing ----------------------------------------------------------------------------


def _draw(ax: Any, panel: Panel) -> None:
    """Lines, round dots, axes and legend of one panel."""
    for s in panel.series:
        ax.plot(s.xs, s.ys, color=s.color, linestyle=s.linestyle, marker=s.marker, linewidth=s.width, label=s.label)
        for x, values in zip(s.xs, s.rounds):
            if len(values) > 1:
                ax.scatter([x] * len(values), values, color=s.color, alpha=0.4, s=14, linewidths=0)
    if any(len(values) > 1 for s in panel.series for values in s.rounds):
        ax.scatter([], [], color="0.4", alpha=0.5, s=14, linewidths=0, label="single rounds")
    _x_axis(ax, sorted({x for s in panel.series for x in s.xs}))
    _y_axis(ax, log=panel.log_y and panel.spans_decades())
    ax.set_ylabel(panel.ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, handlelength=3)


def _x_axis(ax: Any, xs: Sequence[float]) -> None:
    """Log scale (base 2: concurrency, workers and processes double), a tick at each measured x."""
    from matplotlib.ticker import NullLocator

    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.xaxis.set_minor_locator(NullLocator())


def _y_axis(ax: Any, log: bool) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    if log:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_minor_formatter(NullFormatter())
    else:
        ax.set_ylim(bottom=0)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 10 or v == 0 else f"{v:g}"))


def _render(chart: Chart, path: Path) -> Path:
    plt = _pyplot()
    from PIL import Image  # matplotlib's own dependency

    fig, axes = plt.subplots(1, len(chart.panels), figsize=(5.0 * len(chart.panels), 4.0), squeeze=False)
    for ax, panel in zip(axes[0], chart.panels):
        _draw(ax, panel)
        ax.set_xlabel(chart.xlabel)
    fig.suptitle(chart.title, fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    # A line chart has few colours: a 256-colour palette keeps it sharp at a third of the size.
    Image.open(buffer).convert("RGB").quantize(colors=256).save(path, optimize=True)
    return path


def plot_result(path: Path) -> list[Path]:
    """Write the chart(s) of one result file next to it; return their paths ([] if it is not a curve)."""
    path = Path(path)
    if path.suffix != ".json":
        return []
    doc = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(doc, dict):
        return []
    for kind in KINDS:
        charts = kind(doc, path)
        if charts:
            return [_render(chart, path.with_name(path.stem + chart.suffix + ".png")) for chart in charts]
    return []


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", type=Path, help="result files (default: all under benchmarks/results)")
    args = parser.parse_args(argv)
    for path in args.files or sorted(RESULTS.rglob("*.json")):
        written = plot_result(path)
        if not written and args.files:
            print(f"{path}: not a kind of result this script charts", file=sys.stderr)
        for png in written:
            print(png)


if __name__ == "__main__":
    main()
