"""Package size vs PSNR over the pipeline's packages and every sweep result, per model, with the Pareto front.

One set of points feeds the report's table, the PNG chart and the plot data `dvc plots show` renders.
"""

from __future__ import annotations

import dataclasses
import os
from collections import defaultdict
from pathlib import Path

from voxtral_coreml.pipeline.atomic import atomic_path, write_json_atomic
from voxtral_coreml.pipeline.errors import read_json
from voxtral_coreml.pipeline.paths import MANIFEST, SWEEP_RESULT_FILE, metrics_file, package_dir

from .markdown import table_head, table_row


@dataclasses.dataclass(frozen=True)
class Point:
    model: str  # the chart a point belongs to: the model, or the model and its weights if sweeps changed them
    label: str  # the recipe, and for a sweep the overrides that made it ("pal4g group_size=8")
    origin: str  # "pipeline" or "sweep"
    where: str  # the package's folder
    size_bytes: int
    psnr_db: float
    gate_db: float
    average_bits: float
    weights_sha256: str

    @property
    def size_mb(self) -> float:
        return self.size_bytes / 1e6


def pipeline_points(models: list[str], recipes: list[str]) -> list[Point]:
    """The pipeline's packages that exist (the report stage depends on all of them; a sweep-only run has none)."""
    points = []
    for model in models:
        for recipe in recipes:
            if not metrics_file(model, recipe).is_file():
                continue
            metrics = read_json(metrics_file(model, recipe))
            manifest = read_json(package_dir(model, recipe) / MANIFEST)
            where = str(package_dir(model, recipe))
            points.append(_point(model, recipe, "pipeline", where, metrics, manifest))
    return points


def sweep_points(results_dir: str | os.PathLike[str]) -> list[Point]:
    points = []
    for result_file in sorted(Path(results_dir).glob(f"*/{SWEEP_RESULT_FILE}")):
        result = read_json(result_file)
        manifest = read_json(result_file.parent / result["manifest"])
        model = result["config"]["model"]["name"]
        points.append(_point(model, result["label"], "sweep", str(result_file.parent), result["metrics"], manifest))
    return points


def _point(model: str, label: str, origin: str, where: str, metrics: dict, manifest: dict) -> Point:
    return Point(
        model=model,
        label=label,
        origin=origin,
        where=where,
        size_bytes=int(metrics["size_bytes"]),
        psnr_db=float(metrics["psnr_db"]),
        gate_db=float(metrics["gate_db"]),
        average_bits=float(manifest["compression"]["average_bits"]),
        weights_sha256=manifest["weights_sha256"],
    )


def collect_points(models: list[str], recipes: list[str], results_dir: str | os.PathLike[str]) -> list[Point]:
    """Pipeline points first, then sweep points that are not the same package measured again."""
    points: list[Point] = []
    seen = set()
    for p in [*pipeline_points(models, recipes), *sweep_points(results_dir)]:
        same = (p.model, p.weights_sha256, p.label, p.size_bytes, p.psnr_db)
        if same not in seen:
            seen.add(same)
            points.append(p)
    return _split_by_weights(points)


def _split_by_weights(points: list[Point]) -> list[Point]:
    """Points of one model name but other weights (a sweep that changed the source) get a chart of their own."""
    weights = defaultdict(set)
    for p in points:
        weights[p.model].add(p.weights_sha256)
    return [
        dataclasses.replace(p, model=f"{p.model} ({p.weights_sha256[:8]})") if len(weights[p.model]) > 1 else p
        for p in points
    ]


def dominates(a: Point, b: Point) -> bool:
    """a is no larger and no worse than b, and better in one of the two."""
    return (
        a.size_bytes <= b.size_bytes
        and a.psnr_db >= b.psnr_db
        and (a.size_bytes, a.psnr_db) != (b.size_bytes, b.psnr_db)
    )


def pareto_front(points: list[Point]) -> list[Point]:
    """The points of one model that no other point dominates, smallest first. Equal points dominate each other
    nowhere, so both stay; a point as small as another but worse is off."""
    front = [p for p in points if not any(dominates(q, p) for q in points)]
    return sorted(front, key=lambda p: (p.size_bytes, -p.psnr_db, p.label))


def by_model(points: list[Point]) -> dict[str, list[Point]]:
    groups: dict[str, list[Point]] = defaultdict(list)
    for p in points:
        groups[p.model].append(p)
    return {model: sorted(group, key=lambda p: (p.size_bytes, -p.psnr_db, p.label)) for model, group in groups.items()}


def on_front(points: list[Point]) -> set[Point]:
    return {p for group in by_model(points).values() for p in pareto_front(group)}


def tradeoff_table(points: list[Point]) -> list[str]:
    header = ["model", "package", "from", "size (MB)", "average bits", "PSNR (dB)", "gate (dB)", "Pareto front"]
    lines = table_head(header)
    front = on_front(points)
    for model, group in by_model(points).items():
        for p in group:
            below = " (below)" if p.psnr_db < p.gate_db else ""
            cells = [model, p.label, f"{p.origin}: `{p.where}`", f"{p.size_mb:.3f}", p.average_bits, p.psnr_db]
            lines.append(table_row([*cells, f"{p.gate_db:g}{below}", "yes" if p in front else ""]))
    return lines


def plot_records(group: list[Point]) -> list[dict[str, object]]:
    """The plot data of one model's chart (dvc.yaml's `plots:`): one record per point, smallest first."""
    front = pareto_front(group)
    return [
        {
            "model": p.model,
            "label": p.label,
            "origin": p.origin,
            "size_mb": round(p.size_mb, 4),
            "psnr_db": p.psnr_db,
            "gate_db": p.gate_db,
            "average_bits": p.average_bits,
            "pareto": p in front,
        }
        for p in group
    ]


def plot_data_name(model: str) -> str:
    """A file name for a chart's title: "demo-mini (1a2b3c4d)" -> "demo-mini-1a2b3c4d.json"."""
    return "-".join(model.replace("(", " ").replace(")", " ").split()) + ".json"


def write_plot_data(folder: str | os.PathLike[str], points: list[Point]) -> None:
    """One JSON list per model, so that `dvc plots show` draws one chart per model, as the PNG does."""
    with atomic_path(folder) as staging:
        staging.mkdir()
        for model, group in by_model(points).items():
            write_json_atomic(staging / plot_data_name(model), plot_records(group))


DPI = 110
LABEL_FONT_SIZE = 7
LABEL_ROW = LABEL_FONT_SIZE + 3  # points between label rows


def write_chart(path: str | os.PathLike[str], points: list[Point]) -> None:
    """A PNG with one chart per model: PSNR over size (log), each point labelled, the Pareto front as a staircase
    (the best PSNR within a size budget), and each recipe's gate as a faint line."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    groups = by_model(points) or {"no packages yet": []}
    fig, axes = plt.subplots(1, len(groups), figsize=(6.4 * len(groups), 4.8), squeeze=False)
    for ax, (model, group) in zip(axes[0], groups.items(), strict=True):
        _draw(ax, model, group)
    fig.tight_layout()
    for ax, group in zip(axes[0], groups.values(), strict=True):
        # Once the layout is final: labels go where they overlap nothing.
        _label_gates(ax, group)
        _label_points(ax, group)
    with atomic_path(path) as staging:
        fig.savefig(staging, format="png", dpi=DPI, metadata={"Software": None})  # no version stamp: same bytes
    plt.close(fig)


def _draw(ax, model: str, group: list[Point]) -> None:
    from matplotlib.ticker import FormatStrFormatter

    front = pareto_front(group)
    for gate in sorted({p.gate_db for p in group}):
        ax.axhline(gate, color="0.8", lw=0.8, ls=":", zorder=0)
    ax.step(
        [p.size_mb for p in front],
        [p.psnr_db for p in front],
        where="post",
        color="C0",
        lw=1.4,
        label="Pareto front",
        zorder=1,
    )
    for origin, marker in (("pipeline", "o"), ("sweep", "^")):
        for dominated in (False, True):
            shown = [p for p in group if p.origin == origin and (p not in front) == dominated]
            if not shown:
                continue
            style = {"facecolors": "none", "edgecolors": "0.45"} if dominated else {"color": "C0"}
            ax.scatter(
                [p.size_mb for p in shown],
                [p.psnr_db for p in shown],
                marker=marker,
                zorder=2,
                label=f"{origin}, {'dominated' if dominated else 'on the front'}",
                **style,
            )
    ax.set_xscale("log")
    ax.margins(x=0.12, y=0.08)  # room for the labels of the outermost points
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.tick_params(axis="x", which="minor", labelsize=LABEL_FONT_SIZE)
    ax.set(title=model, xlabel="package size (MB, log scale)", ylabel="PSNR vs transformers (dB)")
    ax.grid(True, which="both", alpha=0.2)
    if group:
        # Top left stays empty on a size-vs-accuracy chart: nothing is both that small and that accurate.
        ax.legend(fontsize=LABEL_FONT_SIZE, loc="upper left")


def _label_gates(ax, group: list[Point]) -> None:
    """Each gate line's value and recipes at the right edge, above the line, or below it where the next gate up
    is too close for its label to fit."""
    gates = sorted({p.gate_db for p in group})
    line_gap = LABEL_ROW * DPI / 72  # one label row, in pixels
    for i, gate in enumerate(gates):
        recipes = sorted({p.label.split()[0] for p in group if p.gate_db == gate})
        above = i + 1 == len(gates) or _pixel_y(ax, gates[i + 1]) - _pixel_y(ax, gate) > line_gap
        ax.annotate(
            f"gate {gate:g} dB: {', '.join(recipes)}",
            (1, gate),
            xycoords=("axes fraction", "data"),
            xytext=(-2, 1 if above else -1),
            textcoords="offset points",
            ha="right",
            va="bottom" if above else "top",
            fontsize=LABEL_FONT_SIZE,
            color="0.5",
        )


def _pixel_y(ax, psnr_db: float) -> float:
    return float(ax.transData.transform((1, psnr_db))[1])


def _label_points(ax, group: list[Point]) -> None:
    """Each point's label at the first free slot near it: left of the point (clear of the front's staircase,
    which leaves each point rightwards and reaches it from below), then right, then further up or down with a
    leader line. Free: inside the axes, off the legend, the markers and the labels placed so far."""
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    marker = 4 * DPI / 72  # half a marker's size, in pixels
    taken = [Bbox.from_bounds(x - marker, y - marker, 2 * marker, 2 * marker) for x, y in _pixels(ax, group)]
    if ax.get_legend():
        taken.append(ax.get_legend().get_window_extent(renderer))
    slots = _label_slots(rows=int(frame.height * 72 / DPI / LABEL_ROW) + 1)  # up to the whole axes' height
    for p in sorted(group, key=lambda p: (-p.psnr_db, p.size_bytes, p.label)):
        for dx, dy in slots:
            label = ax.annotate(
                p.label,
                (p.size_mb, p.psnr_db),
                xytext=(dx, dy),
                textcoords="offset points",
                ha="right" if dx < 0 else "left",
                va="center",
                fontsize=LABEL_FONT_SIZE,
                arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.5} if dy else None,
            )
            label.update_positions(renderer)
            box = Text.get_window_extent(label, renderer)  # the text alone: its leader line ends at a marker
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            if (dx, dy) == slots[-1] or (inside and not any(box.overlaps(other) for other in taken)):
                taken.append(box)
                break
            label.remove()


def _pixels(ax, group: list[Point]) -> list[tuple[float, float]]:
    return [tuple(ax.transData.transform((p.size_mb, p.psnr_db))) for p in group]


def _label_slots(rows: int, gap: float = 6) -> list[tuple[float, float]]:
    """Offsets (points) from a point to its label, nearest first: left, right, then rows above and below. The
    last is used even if it is not free: a label is never dropped."""
    slots = []
    for row in range(rows):
        for dy in sorted({row * LABEL_ROW, -row * LABEL_ROW}, reverse=True):
            slots += [(-gap, dy), (gap, dy)]
    return slots
