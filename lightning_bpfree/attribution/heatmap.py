"""Token-importance heatmaps: a self-contained HTML snippet and a matplotlib PNG."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

from lightning_bpfree.validation import check_positive_int


def token_strings(tokenizer, input_ids: Tensor) -> list[str]:
    """Readable token strings: each id decoded alone by ``tokenizer`` (or the ids as text without one)."""
    ids = [int(i) for i in input_ids.flatten()]
    if tokenizer is None:
        return [str(i) for i in ids]
    return [tokenizer.decode([i]) for i in ids]


def _shares(importance: Tensor) -> list[float]:
    scores = importance.detach().float().flatten().clamp(min=0)
    top = float(scores.max()) if scores.numel() else 0.0
    return (scores / top).tolist() if top > 0 else [0.0] * scores.numel()


def heatmap_html(tokens: Sequence[str], importance: Tensor, title: str = "", target: str | None = None) -> str:
    """An HTML page of ``tokens`` shaded by ``importance`` ``[N]`` (darkest = most important).

    Each token's exact score is in its hover title.
    """
    if len(tokens) != importance.numel():
        raise ValueError(f"got {len(tokens)} tokens but {importance.numel()} importance scores")
    spans = []
    for token, share, score in zip(tokens, _shares(importance), importance.flatten().tolist()):
        text = html.escape(token).replace("\n", "\\n") or "&nbsp;"
        spans.append(
            f'<span title="{score:.4g}" style="background: rgba(214, 39, 40, {share:.3f}); '
            f'padding: 2px 1px; border-radius: 3px; white-space: pre">{text}</span>'
        )
    heading = f"<h3>{html.escape(title)}</h3>" if title else ""
    explained = f"<p>explained next token: <b>{html.escape(target)}</b></p>" if target is not None else ""
    body = "".join(spans)
    return (
        '<!doctype html><html><head><meta charset="utf-8"><title>token importance</title></head>'
        f'<body style="font-family: monospace; line-height: 2">{heading}{explained}<p>{body}</p></body></html>\n'
    )


def plot_heatmap(
    tokens: Sequence[str], importance: Tensor, path: str | Path, title: str = "", tokens_per_row: int = 12
) -> Path:
    """Save a PNG of ``tokens`` as coloured cells (rows of ``tokens_per_row``) with the score under each."""
    from lightning_bpfree.benchmarking import new_figure, save_figure

    check_positive_int("tokens_per_row", tokens_per_row)
    if len(tokens) != importance.numel():
        raise ValueError(f"got {len(tokens)} tokens but {importance.numel()} importance scores")
    shares = _shares(importance)
    rows = max(1, -(-len(tokens) // tokens_per_row))
    fig, (ax,) = new_figure(width=min(14.0, 1.1 * tokens_per_row), height=0.9 * rows + 0.8)
    import matplotlib

    colours = matplotlib.colormaps["Reds"]
    for index, (token, share) in enumerate(zip(tokens, shares)):
        row, col = divmod(index, tokens_per_row)
        ax.add_patch(_cell(col, rows - 1 - row, colours(0.1 + 0.85 * share)))
        label = token.replace("\n", "\\n").strip() or repr(token)
        ink = "white" if share > 0.6 else "black"
        ax.text(col + 0.5, rows - 1 - row + 0.6, label[:10], ha="center", va="center", fontsize=8, color=ink)
        ax.text(col + 0.5, rows - 1 - row + 0.25, f"{share:.2f}", ha="center", va="center", fontsize=6, color=ink)
    ax.set_xlim(0, tokens_per_row)
    ax.set_ylim(0, rows)
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def _cell(x: float, y: float, colour):
    from matplotlib.patches import Rectangle

    return Rectangle((x + 0.03, y + 0.05), 0.94, 0.9, color=colour)
