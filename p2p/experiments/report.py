"""The experiment's summary (summary.md) and contact sheet (index.html), made from its rows.

summary.md: what ran, then for each grid axis the mean of every numeric measure at each of its values
(a list of values, one per edited image, counts as its mean; missing values are left out), then one line
per job. index.html: a static page (no scripts) with each job's grid.png as a thumbnail, in a table whose
columns are the values of the last grid axis and whose rows are those of the one before, one table per
combination of the other axes; hovering a thumbnail shows the job's settings, a click opens the image.
"""
from __future__ import annotations

import html
import itertools
import json
import math

MAX_JOB_LINES = 500  # summary.md lists the jobs one per line up to this many


def scalars(measures: dict) -> dict[str, float]:
    """The numeric measures of a row, a list of numbers as its mean (None and NaN left out)."""
    out = {}
    for k, v in measures.items():
        values = v if isinstance(v, list) else [v]
        nums = [float(x) for x in values if isinstance(x, (int, float)) and not isinstance(x, bool)
                and math.isfinite(x)]
        if nums and len(nums) == len([x for x in values if x is not None]):
            out[k] = sum(nums) / len(nums)
    return out


def fmt(x) -> str:
    return "-" if x is None else f"{x:.3g}"


def axis_values(rows: list[dict], axis: str) -> list[str]:
    return list(dict.fromkeys(r["axes"].get(axis, "") for r in rows))


def summary(experiment, rows: list[dict], total: int) -> str:
    """summary.md: counts, the means of each measure by axis value, and one line per job."""
    names = list(dict.fromkeys(k for r in rows for k in scalars(r["measures"])))
    lines = [f"# Experiment {experiment.path}", ""]
    if experiment.description:
        lines += [experiment.description, ""]
    model = rows[0]["model"] if rows else {}
    lines += [f"{len(rows)} of {total} jobs done; model {experiment.model} "
              f"(fingerprint {model.get('fingerprint', '-')}, {model.get('dtype', '-')}); "
              f"measures: {', '.join(experiment.measures) or 'none'}.", ""]
    if rows:
        sampling = sum(r["timing"]["sampling_s"] for r in rows)
        lines += [f"Sampling time {sampling:.1f} s in all, {sampling / len(rows):.2f} s per job.", ""]
    for axis in experiment.axes:
        if not names:
            break
        lines += [f"## By {axis}", "", "| " + axis + " | jobs | " + " | ".join(names) + " |",
                  "|---" * (len(names) + 2) + "|"]
        for value in axis_values(rows, axis):
            chosen = [scalars(r["measures"]) for r in rows if r["axes"].get(axis) == value]
            means = [[m[n] for m in chosen if n in m] for n in names]
            lines.append(f"| {value} | {len(chosen)} | "
                         + " | ".join(fmt(sum(v) / len(v) if v else None) for v in means) + " |")
        lines.append("")
    lines += ["## Jobs", "", "| # | id | " + " | ".join(experiment.axes) + (" | " if experiment.axes else "")
              + " | ".join(names) + " |", "|---" * (2 + len(experiment.axes) + len(names)) + "|"]
    for r in rows[:MAX_JOB_LINES]:
        m = scalars(r["measures"])
        cells = [str(r["index"]), r["id"], *[r["axes"].get(a, "") for a in experiment.axes],
                 *[fmt(m.get(n)) for n in names]]
        lines.append("| " + " | ".join(cells) + " |")
    if len(rows) > MAX_JOB_LINES:
        lines.append(f"\n({len(rows) - MAX_JOB_LINES} more jobs in results.jsonl)")
    return "\n".join(lines) + "\n"


STYLE = """body{font-family:sans-serif;margin:1em}table{border-collapse:collapse;margin-bottom:1.5em}
td,th{border:1px solid #ccc;padding:4px;vertical-align:top;font-size:12px}img{max-width:320px;display:block}
th{background:#f4f4f4}.m{color:#555}"""


def cell(row: dict | None) -> str:
    if row is None:
        return "<td class=m>not done</td>"
    tip = html.escape("\n".join(f"{k}: {json.dumps(v)}" for k, v in {"id": row["id"], **row["settings"]}.items()),
                      quote=True)
    src = html.escape(f"jobs/{row['id']}/grid.png", quote=True)
    m = scalars(row["measures"])
    text = "<br>".join(f"{html.escape(k)} {fmt(v)}" for k, v in m.items())
    return f'<td><a href="{src}"><img src="{src}" title="{tip}" alt="{html.escape(row["id"])}"></a>' \
           f'<span class=m>{text}</span></td>'


def html_page(experiment, rows: list[dict], total: int) -> str:
    """index.html: thumbnails grouped by the grid's axes, settings on hover, no scripts."""
    axes = list(experiment.axes)
    cols = axes[-1:] or [None]
    rows_axis = axes[-2:-1] or [None]
    outer = axes[:-2]
    by_key = {tuple(r["axes"].get(a) for a in axes): r for r in rows}
    values = {a: axis_values(rows, a) for a in axes}
    title = html.escape(f"Experiment {experiment.path}")
    parts = [f"<!doctype html><meta charset=utf-8><title>{title}</title><style>{STYLE}</style>",
             f"<h1>{title}</h1><p>{html.escape(experiment.description)}</p>",
             f"<p>{len(rows)} of {total} jobs done. Hover a thumbnail for its settings; click to open it.</p>"]
    for combo in itertools.product(*(values[a] for a in outer)):
        if outer:
            parts.append("<h2>" + html.escape(", ".join(f"{a} = {v}" for a, v in zip(outer, combo))) + "</h2>")
        col, row_axis = cols[0], rows_axis[0]
        col_values = values.get(col, [None])
        parts.append("<table><tr><th>" + html.escape(f"{row_axis or ''} \\ {col or ''}") + "</th>"
                     + "".join(f"<th>{html.escape(str(v))}</th>" for v in col_values) + "</tr>")
        for rv in values.get(row_axis, [None]):
            parts.append(f"<tr><th>{html.escape(str(rv or ''))}</th>")
            for cv in col_values:
                key = dict(zip(outer, combo))
                if row_axis:
                    key[row_axis] = rv
                if col:
                    key[col] = cv
                parts.append(cell(by_key.get(tuple(key.get(a) for a in axes))))
            parts.append("</tr>")
        parts.append("</table>")
    return "\n".join(parts) + "\n"
