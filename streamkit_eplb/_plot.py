"""Heat maps: layers x expert slots with the expert-parallel split marked and per-layer balancedness
beside the map; aggregated to one column per rank (ranks binned beyond that) when there are too many
slots to draw, so the picture stays a readable size at any scale (at most ~1,700 px wide)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:  # pragma: no cover
    from ._heat import Heat


def slot_matrix(heat: "Heat", ep_size: int | None) -> tuple[torch.Tensor, int, str]:
    """``(L, P)`` tokens per slot in rank-major slot order, the number of EP ranks, and the x label."""
    if ep_size is None and heat.reduce == "gather" and heat.world_size > 1:
        # every rank recorded its local slots: rank r's slots are columns [r*E, (r+1)*E)
        return heat.load.reshape(heat.num_layers, -1), heat.world_size, "slot (rank-local slots, rank-major)"
    if ep_size is None and heat.reduce == "sum" and heat.num_experts % heat.num_ranks == 0:
        ep_size = heat.num_ranks  # global slots, summed over the group: split them over its ranks
    ranks = ep_size if ep_size is not None else 1
    if heat.num_experts % ranks:
        raise ValueError(f"heatmap(ep_size): num_experts={heat.num_experts} is not divisible by ep_size={ranks}")
    return heat.total(), ranks, "physical expert slot"


def aggregate(matrix: torch.Tensor, ranks: int, max_columns: int) -> tuple[torch.Tensor, list[int], str | None]:
    """Shrink ``(L, P)`` to at most ``max_columns`` columns. Returns the matrix, the column index where
    each rank starts (the EP split; empty when a column is a rank or a bin of ranks), and a note."""
    layers, slots = matrix.shape
    per_rank = slots // ranks
    if slots <= max_columns:
        return matrix, [r * per_rank for r in range(1, ranks)], None
    totals = matrix.reshape(layers, ranks, per_rank).sum(dim=2)
    if ranks <= max_columns:
        return totals, [], f"one column per rank ({per_rank} slots each, summed)"
    per_bin = -(-ranks // max_columns)
    bins = -(-ranks // per_bin)
    padded = torch.zeros(layers, bins * per_bin, dtype=totals.dtype)
    padded[:, :ranks] = totals
    return padded.reshape(layers, bins, per_bin).sum(dim=2), [], f"one column per {per_bin} ranks (summed)"


def heatmap(panels: Sequence[tuple["Heat", str]], path: str, *, ep_size: int | None = None, max_columns: int = 256) -> None:
    """One row per (heat, title): the map and, beside it, per-layer balancedness bars."""
    figure(panels, ep_size=ep_size, max_columns=max_columns).savefig(path, format="png", dpi=100)


def figure(panels: Sequence[tuple["Heat", str]], *, ep_size: int | None = None, max_columns: int = 256):  # noqa: ANN201
    """The matplotlib Figure :func:`heatmap` saves. Axis ticks are integers at any scale: slot or
    rank numbers (a binned column is labelled with its first rank), layer numbers."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter, MaxNLocator
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Heat.heatmap() needs matplotlib: pip install 'streamkit[plot]' (or pip install matplotlib)"
        ) from exc
    if not isinstance(max_columns, int) or max_columns < 2:
        raise ValueError(f"heatmap(max_columns): expected an int >= 2, got {max_columns!r}")
    prepared = []
    for heat, title in panels:
        matrix, ranks, xlabel = slot_matrix(heat, ep_size)
        shown, splits, note = aggregate(matrix, ranks, max_columns)
        per_column = 1
        if shown.shape[1] != matrix.shape[1]:  # a column is a rank or a bin of ranks
            per_column = -(-ranks // shown.shape[1])
        balance = heat.balancedness(None if xlabel.startswith("slot (rank-local") else ranks)
        prepared.append((shown.to(torch.float64).numpy(), splits, note, xlabel, balance, title, ranks, per_column))
    columns = max(p[0].shape[1] for p in prepared)
    layers = max(p[0].shape[0] for p in prepared)
    width = min(4.0 + 0.06 * columns, 14.0) + 2.5
    height = min(1.2 + 0.25 * layers, 7.0) * len(prepared) + 0.6
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.subplots(len(prepared), 2, squeeze=False, gridspec_kw={"width_ratios": [5, 1]})
    vmax = max(max(float(p[0].max()) if p[0].size else 0.0 for p in prepared), 1.0)
    image = None
    for (data, splits, note, xlabel, balance, title, ranks, per_column), (ax, bar) in zip(prepared, grid):
        image = ax.imshow(data, aspect="auto", interpolation="nearest", cmap="inferno", vmin=0, vmax=vmax)
        # integer ticks only (a column is a slot, a rank or a bin of `per_column` ranks)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos, k=per_column: f"{int(round(x)) * k:d}"))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _pos: f"{int(round(y)):d}"))
        for x in splits:
            ax.axvline(x - 0.5, color="cyan", linewidth=0.8)
        ax.set_title(f"{title}  ({ranks} EP rank{'s' if ranks != 1 else ''})", fontsize=9)
        ax.set_xlabel(note or (xlabel + ("; cyan lines: EP split" if splits else "")), fontsize=8)
        ax.set_ylabel("layer")
        ys = list(range(len(balance)))
        bar.barh(ys, balance.tolist(), color="tab:green")
        bar.set_xlim(0, 1.0)
        bar.set_ylim(len(balance) - 0.5, -0.5)
        bar.set_yticks([])
        bar.set_xlabel("balancedness\n(mean/max)", fontsize=8)
        bar.set_title(f"mean {float(balance.mean()):.3f}", fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=[row[0] for row in grid], label="tokens", shrink=0.8)
    return fig
