"""The evaluation report: one self-contained HTML file (images as data URIs, plots as inline SVG, no script).

``render(data)`` takes the dict written to ``metrics.json`` and returns the HTML text.
"""
from __future__ import annotations

import base64
import html
import io
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

THUMB_SIDE = 176
COLORS = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2")

CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px;color:#111;background:#fafafa}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd}
.muted{color:#666}.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:12px 16px;margin:10px 0}
table{border-collapse:collapse;background:#fff}td,th{border:1px solid #ddd;padding:4px 8px;text-align:left;
vertical-align:top}th{background:#f1f1f1}td.num{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#15803d;font-weight:600}.bad{color:#b91c1c;font-weight:600}.warn{color:#b45309;font-weight:600}
.grid td{padding:4px}.cell{display:flex;gap:4px;flex-wrap:wrap}figure{margin:0;text-align:center}
figure img{display:block;width:120px;height:auto;border:1px solid #ccc;background:#eee}
figcaption{font-size:11px;color:#333}.plots{display:flex;gap:16px;flex-wrap:wrap}
.best{background:#ecfdf5}.failure{border-left:4px solid #dc2626}.pass{border-left:4px solid #16a34a}
code{background:#f1f1f1;padding:0 3px;border-radius:3px}
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return esc(value)


def pct(value: Any) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def thumbnail(path: str | Path, side: int = THUMB_SIDE) -> str | None:
    """A JPEG data URI of the image scaled to fit side×side; None when it cannot be read."""
    from lora_run_folder.images import ImageProblem, open_rgb

    try:
        image = open_rgb(Path(path)).image
    except (ImageProblem, OSError):
        return None
    image.thumbnail((side, side))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=82)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    first = math.ceil(lo / step) * step
    out, v = [], first
    while v <= hi + 1e-9 * step:
        out.append(round(v, 10))
        v += step
    return out


def line_chart(series: Sequence[tuple[str, Sequence[tuple[float, float]]]], *, title: str, x_label: str,
               y_label: str, width: int = 560, height: int = 300, y_range: tuple[float, float] | None = None,
               markers: Iterable[tuple[float, str]] = (), faint: Sequence[tuple[float, float]] = ()) -> str:
    """An inline SVG line chart. ``faint`` is drawn as thin grey points behind (raw loss)."""
    pts = [p for _, s in series for p in s] + list(faint)
    if not pts:
        return f'<div class="card muted">{esc(title)}: no data</div>'
    left, right, top, bottom = 58, 16, 46, 44
    xs = [p[0] for p in pts]
    ys = [p[1] for p in pts]
    x0, x1 = min(xs), max(xs)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    y0, y1 = y_range if y_range else (min(ys), max(ys))
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = (y1 - y0) * 0.05 if not y_range else 0.0
    y0, y1 = y0 - pad, y1 + pad
    pw, ph = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * ph

    parts = [f'<svg width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{esc(title)}" '
             'style="background:#fff;border:1px solid #ddd;border-radius:6px">',
             f'<text x="{width / 2}" y="18" text-anchor="middle" font-size="14" font-weight="600">{esc(title)}</text>']
    for t in _ticks(y0, y1):
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#eee"/>'
                     f'<text x="{left - 6}" y="{sy(t) + 4:.1f}" text-anchor="end" font-size="11">{t:g}</text>')
    for t in _ticks(x0, x1, 6):
        parts.append(f'<line x1="{sx(t):.1f}" x2="{sx(t):.1f}" y1="{top + ph}" y2="{top + ph + 4}" stroke="#666"/>'
                     f'<text x="{sx(t):.1f}" y="{top + ph + 16}" text-anchor="middle" font-size="11">{t:g}</text>')
    parts.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>')
    parts.append(f'<text x="{left + pw / 2}" y="{height - 8}" text-anchor="middle" font-size="12">'
                 f'{esc(x_label)}</text>')
    parts.append(f'<text x="14" y="{top + ph / 2}" text-anchor="middle" font-size="12" '
                 f'transform="rotate(-90 14 {top + ph / 2})">{esc(y_label)}</text>')
    for x, label in markers:
        parts.append(f'<line x1="{sx(x):.1f}" x2="{sx(x):.1f}" y1="{top}" y2="{top + ph}" stroke="#a3a3a3" '
                     f'stroke-dasharray="4 3"><title>{esc(label)}</title></line>')
    if faint:
        parts.append("".join(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="1.3" fill="#bbb"/>' for x, y in faint))
    legend_x = left
    for n, (name, s) in enumerate(series):
        color = COLORS[n % len(COLORS)]
        s = sorted(s)
        if len(s) > 1:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        if len(s) <= 60:
            parts.append("".join(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3.5" fill="{color}">'
                                 f'<title>{esc(name)}: {x:g} → {y:.3f}</title></circle>' for x, y in s))
        parts.append(f'<rect x="{legend_x}" y="{top - 13}" width="12" height="3" fill="{color}"/>'
                     f'<text x="{legend_x + 16}" y="{top - 8}" font-size="11">{esc(name)}</text>')
        legend_x += 28 + 6 * len(name)
    parts.append("</svg>")
    return "".join(parts)


def smooth(points: Sequence[tuple[float, float]], window: int) -> list[tuple[float, float]]:
    """Trailing moving average (for the loss curve)."""
    out, acc = [], []
    for x, y in points:
        acc.append(y)
        if len(acc) > window:
            acc.pop(0)
        out.append((x, sum(acc) / len(acc)))
    return out


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], row_class: Sequence[str] = ()) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for n, row in enumerate(rows):
        cls = f' class="{row_class[n]}"' if n < len(row_class) and row_class[n] else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{c}</td>" if not c.startswith("<td") else c for c in row) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _num(value: Any, digits: int = 3) -> str:
    return f'<td class="num">{fmt(value, digits)}</td>'


def _figure(rec: dict[str, Any]) -> str:
    uri = thumbnail(rec["path"])
    if rec["face"]:
        verdict = "match" if rec["match"] else "no match"
        cls = "ok" if rec["match"] != rec.get("control", False) else "bad"
        caption = f'<span class="{cls}">{fmt(rec["score"], 2)}</span> {verdict}'
    else:
        caption = f'<span class="warn">{esc(rec["note"] or "no face")}</span>'
    seed = f"seed {rec['seed']} · " if rec.get("seed") is not None else ""
    if rec.get("control") and rec.get("prompt_index") is None:
        seed = "control · " + seed
    img = (f'<img src="{uri}" alt="{esc(rec["name"])}">' if uri
           else '<div class="muted" style="width:120px">unreadable</div>')
    return f'<figure title="{esc(rec["path"])}">{img}<figcaption>{seed}{caption}</figcaption></figure>'


def grid_html(metrics: dict[str, Any], prompts: Sequence[str], strengths: Sequence[float]) -> str:
    records = metrics["images"]
    if not prompts or not strengths or all(r.get("prompt_index") is None for r in records):
        return '<div class="cell">' + "".join(_figure(r) for r in records) + "</div>"
    head = "<tr><th>prompt \\ strength</th>" + "".join(f"<th>{s:g}</th>" for s in strengths) + "</tr>"
    rows = []
    for i, prompt in enumerate(prompts):
        cells = []
        for s in strengths:
            recs = [r for r in records if r.get("prompt_index") == i and r.get("strength") == s]
            cells.append('<td><div class="cell">' + "".join(_figure(r) for r in recs) + "</div></td>")
        tag = ' <span class="muted">(control: no trigger)</span>' if all(
            r.get("control") for r in records if r.get("prompt_index") == i) else ""
        rows.append(f'<tr><th style="max-width:220px">{esc(prompt)}{tag}</th>{"".join(cells)}</tr>')
    return f'<table class="grid">{head}{"".join(rows)}</table>'


def _failures_html(failures: list[dict[str, Any]]) -> str:
    if not failures:
        return ('<div class="card pass"><span class="ok">No failure signal.</span> Identity holds, the control '
                'prompt does not take the subject\'s face, and seeds give different images.</div>')
    out = []
    for f in failures:
        ev = "".join(f"<li>{esc(e)}</li>" for e in f["evidence"])
        out.append(f'<div class="card failure"><span class="bad">{esc(f["name"])}</span> '
                   f'<span class="muted">— cause: {esc(f["cause"])}</span><ul>{ev}</ul>'
                   f'<b>Fix:</b> {esc(f["fix"])}</div>')
    return "".join(out)


def _copies(names: list[str], compared: int | None, kind: str) -> str:
    """"2 of 6 trigger images: a, b" — the count behind a memorisation rate."""
    if not compared:
        return f"not measured (no readable {kind} image or subject photo)"
    listed = ", ".join(names[:8]) + (" …" if len(names) > 8 else "")
    return f"{len(names)} of {compared} {kind} images" + (f": {listed}" if names else "")


def _headline(m: dict[str, Any]) -> str:
    ident, leak, div = m["identity"], m["leakage"], m["diversity"]
    at = f" (strength {ident['reference_strength']:g})" if ident["reference_strength"] is not None else ""
    rows = [
        ("identity score" + at, fmt(ident["score"]), "1 − mean distance / (2τ); > 0.5 = same person"),
        ("faces found" + at, pct(ident["face_rate"]), f"{ident['faces']} of {ident['images']} trigger images"),
        ("match rate" + at, pct(ident["match_rate"]), "trigger images whose face matches the subject"),
        ("subject vs itself", fmt(m["subject"]["self_score"]),
         f"the {m['subject']['faces']} training faces against each other (the ceiling)"),
        ("leakage (control prompt)", pct(leak["leak_rate"]), f"{leak['faces']} control faces; should be low"),
        ("carbon copies across seeds", pct(div["carbon_copy_rate"]), f"{div['carbon_copy_pairs']} of "
         f"{div['pairs']} pairs"),
        ("image diversity (1 − SSIM)", fmt(div["ssim_distance"]), "mean over seed pairs; 0 = identical"),
        ("hash distance", fmt(div["hash_distance"]), "mean DCT-hash bits differing / 64"),
        ("face embedding spread", fmt(div["embedding_distance"]), "mean pairwise distance across seeds"),
        ("same-pose groups", f"{div['same_pose_groups']} / {div['pose_groups']}", "pose spread < 0.03"),
        ("copies of training photos", pct(div.get("memorised_rate")),
         _copies(div.get("memorised", []), div.get("memorised_compared"), "trigger")),
    ]
    blank = m.get("blank") or {}
    if blank.get("images"):
        rows.append(("blank images", f"{blank['images']} / {blank['of']}", "one flat colour (NaNs?); left out of the "
                     "image comparisons"))
    if div.get("memorised_control_compared"):
        rows.append(("control images copying a training photo", pct(div["memorised_control_rate"]),
                     _copies(div["memorised_control"], div["memorised_control_compared"], "control")))
    rows += [
        ("quality (best-checkpoint rule)", fmt(m["quality"]), "identity − 0.5·leak − 0.5·carbon copies"),
    ]
    return _table(("metric", "value", "meaning"), ([esc(a), f'<td class="num">{b}</td>', esc(c)] for a, b, c in rows))


#: How every report page begins; `score --overwrite` and `eval --overwrite` replace only a file that begins so (one
#: lora-run wrote): the generator mark is lora-run's, where the HTML before it is any minified page's.
REPORT_HEAD = ('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
               '<meta name="generator" content="lora-run identity report">')


def is_report(path: Path) -> bool:
    """Whether ``path`` is a report page lora-run wrote (a regular file beginning with ``REPORT_HEAD``)."""
    if not os.path.isfile(path):      # never opened: a FIFO would block
        return False
    try:
        with open(path, "rb") as fh:
            return fh.read(len(REPORT_HEAD) + 7) == (REPORT_HEAD + "<title>").encode()
    except OSError:
        return False


def render(data: dict[str, Any]) -> str:
    """The whole report page."""
    results = data["results"]
    final = data.get("final") or next(iter(results), None)
    m = results.get(final) if final else None
    title = data.get("title") or "Identity evaluation"
    parts = [f"{REPORT_HEAD}<title>{esc(title)}</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>{esc(title)}</h1>",
             f'<div class="muted">{esc(data.get("created_at", ""))} · embedder {esc(data["embedder"]["name"])} '
             f'({esc(data["embedder"]["metric"])}, τ = {fmt(data["embedder"]["threshold"], 2)}) · '
             f'{esc(data.get("source", ""))}</div>']
    if data.get("about"):  # the recipe's description: what this run is (the demo says it is a demo)
        parts.append(f'<div class="card about">{esc(data["about"])}</div>')
    if m is None:
        parts.append('<div class="card">Nothing was evaluated.</div></body></html>')
        return "".join(parts)
    parts.append(f"<h2>Verdict for {esc(final)}</h2>")
    parts.append(_failures_html(m["failures"]))
    notes = data.get("strength_notes", {}).get(final) or []
    if notes:
        parts.append('<div class="card">' + "<br>".join(esc(n) for n in notes) + "</div>")
    entries = data.get("loras", [])
    best = data.get("best") or {}
    if len(entries) > 1 or best.get("label"):
        parts.append("<h2>Checkpoints</h2>")
        if best.get("label"):
            parts.append(f'<div class="card pass"><b>Best: {esc(best["label"])}</b> — {esc(best["reason"])}</div>')
        elif best:
            parts.append(f'<div class="card">{esc(best.get("reason", ""))}</div>')
        rows, classes = [], []
        for e in entries:
            rows.append([esc(e["label"]), _num(e.get("step"), 0), _num(e["identity"]), f'<td class="num">'
                         f'{pct(e["face_rate"])}</td>', f'<td class="num">{pct(e["leak_rate"])}</td>',
                         f'<td class="num">{pct(e["carbon_copy_rate"])}</td>', _num(e["quality"]),
                         esc(", ".join(e["failures"]) or "–")])
            classes.append("best" if e["label"] == best.get("label") else "")
        parts.append(_table(("LoRA", "step", "identity", "faces", "leakage", "carbon copies", "quality",
                             "failures"), rows, classes))
    overfit = data.get("overfit") or {}
    if overfit:
        cls = "bad" if overfit.get("flagged") else "muted"
        label = ("Loss still falling while identity stopped improving" if overfit.get("flagged")
                 else "Loss vs identity")
        parts.append(f'<div class="card"><span class="{cls}">{label}:</span> {esc(overfit.get("evidence", ""))}</div>')
    plots = []
    loss = data.get("loss_history") or []
    if loss:
        pts = [(float(s), float(v)) for s, v in loss]
        window = max(1, len(pts) // 25)
        marks = [(float(e["step"]), e["label"]) for e in entries if e.get("step") is not None]
        name = "loss" if window == 1 else f"loss (moving average of {window} steps)"
        plots.append(line_chart([(name, smooth(pts, window))], faint=pts,
                                title="Training loss", x_label="step", y_label="loss", markers=marks))
    steps = [e for e in entries if e.get("step") is not None]
    if len(steps) > 1:
        plots.append(line_chart(
            [("identity", [(float(e["step"]), e["identity"]) for e in steps if e["identity"] is not None]),
             ("quality", [(float(e["step"]), e["quality"]) for e in steps if e["quality"] is not None]),
             ("leakage", [(float(e["step"]), e["leak_rate"]) for e in steps if e["leak_rate"] is not None])],
            title="Identity per checkpoint", x_label="step", y_label="score / rate", y_range=(0.0, 1.0)))
    curve = m["strength_curve"]
    if curve:
        plots.append(line_chart(
            [("identity", [(r["strength"], r["score"]) for r in curve if r["score"] is not None]),
             ("faces found", [(r["strength"], r["face_rate"]) for r in curve if r["face_rate"] is not None]),
             ("control leak", [(r["strength"], r["leak_rate"]) for r in curve if r["leak_rate"] is not None])],
            title="Identity vs LoRA strength", x_label="LoRA strength", y_label="score / rate",
            y_range=(0.0, 1.0)))
    if plots:
        parts.append('<h2>Plots</h2><div class="plots">' + "".join(plots) + "</div>")
    parts.append("<h2>Metrics</h2>" + _headline(m))
    by_prompt = m["identity"]["by_prompt"]
    if by_prompt:
        parts.append("<h3>Identity per prompt</h3>" + _table(
            ("prompt", "identity", "faces", "match rate"),
            ([esc(p["prompt"]), _num(p["score"]), f'<td class="num">{pct(p["face_rate"])}</td>',
              f'<td class="num">{pct(p["match_rate"])}</td>'] for p in by_prompt)))
    if curve:
        parts.append("<h3>Identity vs strength</h3>" + _table(
            ("strength", "identity", "faces", "match rate", "control leak"),
            ([fmt(r["strength"], 2), _num(r["score"]), f'<td class="num">{pct(r["face_rate"])}</td>',
              f'<td class="num">{pct(r["match_rate"])}</td>', f'<td class="num">{pct(r["leak_rate"])}</td>']
             for r in curve)))
    groups = m["diversity"]["groups"]
    prompts = data.get("prompts") or []
    if groups:
        def gname(g: dict[str, Any]) -> str:
            i = g["prompt_index"]
            name = prompts[i] if i is not None and i < len(prompts) else ("control images" if g["control"]
                                                                         else "all images")
            return name + (f" @ {g['strength']:g}" if g["strength"] is not None else "")
        parts.append("<h3>Diversity across seeds</h3>" + _table(
            ("group", "images", "1 − SSIM", "hash distance", "face spread", "pose spread", "carbon copies"),
            ([esc(gname(g)), _num(g["images"], 0), _num(g["ssim_distance"]), _num(g["hash_distance"]),
              _num(g["embedding_distance"]), _num(g["pose_spread"]),
              f'<td class="num">{g["carbon_copies"]} / {g["pairs"]}</td>'] for g in groups)))
    parts.append("<h2>Images</h2>" if final == "images" else f"<h2>Images: {esc(final)}</h2>")
    parts.append(grid_html(m, prompts, data.get("strengths") or []))
    if best.get("label") and best["label"] != final and best["label"] in results:
        parts.append(f"<h2>Images: best checkpoint {esc(best['label'])}</h2>")
        parts.append(grid_html(results[best["label"]], prompts, data.get("strengths") or []))
    subject = data.get("subject_images") or []
    if subject:
        parts.append("<h2>Subject photos</h2><div class=\"cell\">" + "".join(_figure(r) for r in subject) + "</div>")
    parts.append('<p class="muted">Formulas and thresholds: <code>lora-run docs evaluation</code>. τ is the embedder\'s '
                 'same-person distance threshold.</p></body></html>')
    return "".join(parts)
