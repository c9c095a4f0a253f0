"""A local dashboard for runs without W&B: one self-contained ``report.html`` beside the final model.

Everything is inline (CSS, PNG plots as base64 data URIs), so the file opens from disk in any browser,
offline, and can be mailed as it is. It opens with the verdict (:mod:`.verdict`: parameters, general-text and
healing-domain perplexity as ratios to the base, the StereoSet change with its interval and n, where
the files are), then the stage table of the model card (the shipped model marked), the zero-shot table,
with ``reference_run`` the paired changes vs that run's same stages (:mod:`.reference`), the perplexity
and bias trajectories across rounds (95% intervals as bands), any extra figures (bias heatmaps, ...) and
the card itself, rendered as HTML. Input is the same plain dict as the model card (:mod:`optipfair_train.pipeline.card`).

Example:
    >>> write_report(Path("outputs/demo/final"), card, figures={"bias heatmap": fig})  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..speed import speed_line
from .card import FINAL_MARK, card_header, card_rows, render_model_card, shown_metrics
from .figures import ACTIVATION_DIFFERENCE_DEFINITION
from .reference import reference_card_lines
from .verdict import short_text_name, verdict_lines
from .zeroshot_stage import zeroshot_card_lines

__all__ = ["figure_png", "heal_loss_figure", "markdown_html", "trajectory_figures", "write_report"]

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; } th, td { border: 1px solid #ccc; padding: 4px 8px; }
th { background: #f3f3f3; } td { text-align: right; } td:first-child { text-align: left; white-space: nowrap; }
figure { margin: 1em 0; } img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; }
pre { background: #f8f8f8; padding: 1em; overflow-x: auto; font-size: 0.8em; white-space: pre-wrap; }
.verdict { background: #f4f8ff; border: 1px solid #bcd; padding: 0.6em 1.2em; }
.verdict li { margin: 0.2em 0; } tr.final td { font-weight: bold; background: #fffbe6; }
"""


def figure_png(figure: Any) -> bytes:
    """PNG bytes of a matplotlib figure (PNG bytes are returned as they are).

    Example:
        >>> figure_png(b"\\x89PNG...")[:4]
        b'\\x89PNG'
    """
    if isinstance(figure, (bytes, bytearray)):
        if not bytes(figure[:8]).startswith(b"\x89PNG"):
            raise ValueError("Figure bytes must be a PNG image (they do not start with the PNG signature).")
        return bytes(figure)
    if not hasattr(figure, "savefig"):
        raise TypeError(f"Expected a matplotlib figure or PNG bytes, got {type(figure).__name__}.")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def _stages(card: dict) -> list[tuple[str, dict]]:
    stages = [("base", card["baseline"])]
    for r in card.get("rounds", []):
        stages += [(f"r{r['round']} pruned", r["pruned"]), (f"r{r['round']} healed", r["healed"])]
    return [(name, shown_metrics(m)) for name, m in stages]  # no SS without its LMS, as on the card


def trajectory_figures(card: dict) -> dict[str, Any]:
    """Perplexity and bias across the stages (matplotlib figures; bias with its 95% interval as a band).

    Example:
        >>> sorted(trajectory_figures(card))  # doctest: +SKIP
        ['bias across stages', 'perplexity across stages']
    """
    from matplotlib.figure import Figure

    stages = _stages(card)
    x = list(range(len(stages)))
    labels = [name for name, _ in stages]
    out = {}
    series = {
        "perplexity": [
            (f"{short_text_name(card.get('heal_text')) or 'held-out text'} (healing domain)", "perplexity"),
            (
                f"{short_text_name(card.get('general_text')) or 'general text'} (general)",
                "perplexity/general",
            ),
        ],
        "bias": [("StereoSet SS", "stereoset/ss"), ("CrowS-Pairs", "bias/score")],
    }
    for kind, lines in series.items():
        fig = Figure(figsize=(7, 3.2), layout="constrained")  # rotated stage names stay inside
        ax = fig.subplots()
        drawn = False
        for label, key in lines:
            points = [(i, m[key]) for i, (_, m) in zip(x, stages, strict=True) if m.get(key) is not None]
            if not points:
                continue
            drawn = True
            (line,) = ax.plot(*zip(*points, strict=True), marker="o", label=label)
            bands = [
                (i, m[f"{key}_ci_low"], m[f"{key}_ci_high"])
                for i, (_, m) in zip(x, stages, strict=True)
                if m.get(f"{key}_ci_low") is not None and m.get(f"{key}_ci_high") is not None
            ]
            if bands:
                i, low, high = zip(*bands, strict=True)
                ax.fill_between(i, low, high, color=line.get_color(), alpha=0.15)
        if not drawn:
            continue
        if kind == "bias":
            ax.axhline(50.0, color="gray", linestyle=":", label="no preference (50)")
        ax.set_xticks(x, labels, rotation=20)
        ax.set_ylabel(kind if kind == "perplexity" else "score (95% CI band)")
        ax.legend(fontsize=8)
        out[f"{kind} across stages"] = fig
    loss = heal_loss_figure(card)
    if loss is not None:
        out["healing loss (training loss per step; rounds one after another)"] = loss
    return out


def heal_loss_figure(card: dict) -> Any | None:
    """The healing loss of every round on one step axis (round K starts where round K-1 ended); None
    when no round logged a loss (``heal_method: none``, or a run from before losses were kept).

    Example:
        >>> card = {"rounds": [{"round": 1, "heal_loss": [[1, 3.0], [2, 2.5]]}]}
        >>> heal_loss_figure(card).axes[0].get_xlabel()
        'healing step (all rounds)'
    """
    from matplotlib.figure import Figure

    rounds = [r for r in card.get("rounds", []) if r.get("heal_loss")]
    if not rounds:
        return None
    fig = Figure(figsize=(7, 3.2), layout="constrained")
    ax = fig.subplots()
    offset = 0
    for r in card.get("rounds", []):
        points = r.get("heal_loss") or []
        if points:
            steps, losses = zip(*points, strict=True)
            ax.plot([offset + s for s in steps], losses, label=f"round {r['round']}")
            offset += max(steps)
        if r is not card["rounds"][-1]:
            ax.axvline(offset, color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("healing step (all rounds)")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=8)
    return fig


def _inline(text: str) -> str:
    """Escaped text with `code` spans."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def markdown_html(text: str) -> str:
    """HTML of the model card's markdown (the subset the card uses: YAML front matter, ``#`` headings,
    tables, ``-`` lists, paragraphs, `code`); the front matter goes into a collapsed block.

    Example:
        >>> markdown_html("# Card\\n\\nTrained with `lora`.")
        '<h3>Card</h3>\\n<p>Trained with <code>lora</code>.</p>'
    """
    out: list[str] = []
    lines = text.splitlines()
    if lines and lines[0] == "---":
        end = lines.index("---", 1)
        front = html.escape("\n".join(lines[1:end]))
        out.append(f"<details><summary>metadata (YAML front matter)</summary><pre>{front}</pre></details>")
        lines = lines[end + 1 :]
    blocks: list[list[str]] = [[]]
    for line in lines:
        if line.strip():
            blocks[-1].append(line)
        elif blocks[-1]:
            blocks.append([])
    for block in filter(None, blocks):
        if block[0].startswith("#"):
            level = min(6, len(block[0]) - len(block[0].lstrip("#")) + 2)  # the page's h1/h2 come first
            out.append(f"<h{level}>{_inline(block[0].lstrip('#').strip())}</h{level}>")
            block = block[1:]
        if not block:
            continue
        if block[0].startswith("|"):
            cells = [
                [c.strip() for c in row.strip().strip("|").split("|")] for row in block if "---" not in row
            ]
            head = "".join(f"<th>{_inline(c)}</th>" for c in cells[0])
            body = "".join(
                "<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in cells[1:]
            )
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif block[0].startswith("- "):
            out.append("<ul>" + "".join(f"<li>{_inline(b[2:])}</li>" for b in block) + "</ul>")
        else:
            out.append(f"<p>{_inline(' '.join(block))}</p>")
    return "\n".join(out)


def _has_activation(card: dict) -> bool:
    stages = [card["baseline"]] + [m for r in card.get("rounds", []) for m in (r["pruned"], r["healed"])]
    return any("bias/activation_normalized_difference" in m or "bias/layers" in m for m in stages)


def _img(caption: str, figure: Any) -> str:
    data = base64.b64encode(figure_png(figure)).decode("ascii")
    caption = html.escape(caption)
    return f'<figure><img alt="{caption}" src="data:image/png;base64,{data}"><figcaption>{caption}</figcaption></figure>'


def write_report(
    folder: Path,
    card: dict[str, Any],
    figures: Mapping[str, Any] | None = None,
    name: str = "report.html",
    files: Mapping[str, str] | None = None,
) -> Path:
    """Write ``folder/report.html`` (self-contained) from the card dict and extra ``figures``.

    Args:
        folder: where the file goes (created if missing).
        card: the model card's plain dict (base model, baseline, rounds, speed, ...).
        figures: caption -> matplotlib figure or PNG bytes (e.g. bias heatmaps), shown after the
            trajectories in the order given.
        name: file name.
        files: label -> path of the run's files (final model, card), listed under the verdict.

    Example:
        >>> write_report(Path("outputs/demo/final"), card)  # doctest: +SKIP
        PosixPath('outputs/demo/final/report.html')
    """
    # PNG bytes first: a bad figure is refused before anything is written
    extra = {caption: figure_png(figure) for caption, figure in (figures or {}).items()}
    header = "".join(f"<th>{html.escape(h)}</th>" for h in card_header(card))
    body = "".join(
        ('<tr class="final">' if row["stage"].endswith(FINAL_MARK) else "<tr>")
        + "".join(f"<td>{html.escape(cell)}</td>" for cell in row.values())
        + "</tr>"
        for row in card_rows(card)
    )
    title_line, *lines = verdict_lines(card, files)
    verdict = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
    plots = [_img(c, f) for c, f in trajectory_figures(card).items()] + [_img(c, f) for c, f in extra.items()]
    speed = card.get("speed")
    title = html.escape(f"{card['base_model']}: pruned and healed with optipfair-train")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{title}</title><style>{_CSS}</style></head><body>",
        f"<h1>{title}</h1>",
        f'<div class="verdict"><h2>{html.escape(title_line)}</h2><ul>{verdict}</ul></div>',
        "<h2>Stages</h2>",
        f"<table><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>",
        markdown_html("\n".join(zeroshot_card_lines(card))),
        markdown_html("\n".join(reference_card_lines(card))),
        f"<p>Speed: {html.escape(speed_line(speed)) if speed else 'not measured side by side.'}</p>",
        "<h2>Trajectories and figures</h2>",
        *plots,
        *([f"<p>{html.escape(ACTIVATION_DIFFERENCE_DEFINITION)}</p>"] if _has_activation(card) else []),
        "<h2>Model card</h2>",
        markdown_html(render_model_card(card)),
        "</body></html>",
    ]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(parts) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path
