"""The parity report for people: one self-contained HTML page (`report/parity.html`).

It renders the dict that `validation.parity.validate_package` writes as `parity.json`: a verdict,
one table per backend, the stage errors, exit layers and latencies as plots (inline SVG drawn by
matplotlib, no pyplot state and no external assets, no JavaScript), the speed table and the
thresholds. Every key may be absent or null (an older or partial report, a skipped backend, a run
without an exit): what is missing reads "n/a". All text from the report is escaped.
"""

from __future__ import annotations

import html
import io
import math
import re
from pathlib import Path

CHECK_NAMES = {
    "finite": "no NaN/Inf",
    "logits": "final logits",
    "stages": "stage errors",
    "exit_layers": "exit-layer agreement",
    "tokens": "generated-token agreement",
}
NA = "n/a"
PASS_COLOUR, FAIL_COLOUR, SKIP_COLOUR = "#1a7f37", "#cf222e", "#6e7781"
SERIES = ["#0969da", "#bc4c00", "#8250df", "#1a7f37", "#bf3989", "#57606a"]


# ---------------------------------------------------------------------------- small helpers


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def _list(value) -> list:
    return value if isinstance(value, list) else []


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return None if math.isnan(value) else float(value)


def _fmt(value, spec: str = ".3g", suffix: str = "") -> str:
    """A number as text (escaped), "n/a" when absent or not a number."""
    v = _number(value)
    if v is None:
        return NA
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return _esc(f"{v:{spec}}{suffix}")


def _pct(value) -> str:
    v = _number(value)
    return NA if v is None else _esc(f"{100 * v:.1f}%")


def _bytes(value) -> str:
    v = _number(value)
    if v is None:
        return NA
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(v) < 1024 or unit == "GiB":
            return _esc(f"{v:.0f} {unit}" if unit == "B" else f"{v:.2f} {unit}")
        v /= 1024
    return NA  # unreachable


def _layer(value) -> str:
    if value is None:
        return "no exit"
    return _esc(value)


def _status(passed, skipped=None) -> str:
    if skipped:
        return '<span class="badge skip">SKIPPED</span>'
    if passed is True:
        return '<span class="badge pass">PASS</span>'
    if passed is False:
        return '<span class="badge fail">FAIL</span>'
    return f'<span class="badge skip">{NA}</span>'


def _mpl_text(value) -> str:
    """Text for matplotlib: a `$` would start mathtext."""
    return str(value).replace("$", r"\$")


def _stage_key(item: tuple[int, str]):
    """Pipeline order: vision, then segments and routers by layer, logits last."""
    index, name = item
    if name == "vision":
        return (0, 0, 0, index)
    if name == "logits":
        return (3, 0, 0, index)
    m = re.fullmatch(r"layers (\d+)-(\d+)", name)
    if m:
        return (1, int(m.group(2)), 0, index)
    m = re.fullmatch(r"router (\d+)", name)
    if m:
        return (1, int(m.group(1)), 1, index)
    return (2, 0, 0, index)


def _backends(data: dict) -> dict[str, dict]:
    return {str(k): _dict(v) for k, v in _dict(data.get("backends")).items()}


def _runners(speed: dict) -> dict[str, dict]:
    """The per-runner entries of the speed section (the dict-valued keys)."""
    return {str(k): v for k, v in speed.items() if isinstance(v, dict)}


# ---------------------------------------------------------------------------- plots


def _svg(fig, name: str) -> str:
    import matplotlib

    with matplotlib.rc_context({"svg.hashsalt": f"parity-{name}", "svg.fonttype": "path"}):
        buf = io.StringIO()
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    text = buf.getvalue()
    text = text[text.index("<svg"):]  # drop the XML declaration and DOCTYPE: inline in HTML
    return f'<div class="plot" role="img" aria-label="{_esc(name)}">{text}</div>'


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def stage_error_plot(data: dict) -> str | None:
    """Max relative error per stage, one series per backend that ran, log scale, threshold line."""
    ran = {n: b for n, b in _backends(data).items() if not b.get("skipped") and _dict(b.get("stages"))}
    if not ran:
        return None
    names: list[str] = []
    for b in ran.values():
        for s in _dict(b.get("stages")):
            if str(s) not in names:
                names.append(str(s))
    names = [n for _, n in sorted(enumerate(names), key=_stage_key)]
    threshold = _number(_dict(data.get("thresholds")).get("stage_max_rel"))
    values = [_number(e.get("max_rel")) for b in ran.values() for e in map(_dict, _dict(b.get("stages")).values())]
    positive = [v for v in values if v is not None and v > 0] + ([threshold] if threshold and threshold > 0 else [])
    floor = min(positive) / 100 if positive else 1e-12
    top = max(positive) * 10 if positive else 1.0

    fig = _figure(max(9.0, 0.32 * len(names) + 2.5), 4.2)
    ax = fig.subplots()
    x = list(range(len(names)))
    markers = "osD^v<>"
    for k, (backend, b) in enumerate(ran.items()):
        stages = _dict(b.get("stages"))
        ys, missing = [], []
        for i, s in enumerate(names):
            e = _dict(stages.get(s))
            v = _number(e.get("max_rel"))
            if e.get("missing"):
                missing.append(i)
            ys.append(None if v is None else max(v, floor))
        colour = SERIES[k % len(SERIES)]
        ax.plot(x, [float("nan") if y is None else y for y in ys], marker=markers[k % len(markers)],
                color=colour, linewidth=1.2, markersize=5, label=_mpl_text(backend))
        if missing:
            ax.plot(missing, [top] * len(missing), linestyle="none", marker="x", color=colour,
                    markersize=8, label=_mpl_text(f"{backend}: stage missing"))
    if threshold and threshold > 0:
        ax.axhline(threshold, color=FAIL_COLOUR, linestyle="--", linewidth=1.2,
                   label=_mpl_text(f"threshold (max rel {threshold:.3g})"))
    ax.set_yscale("log")
    ax.set_ylim(floor / 2, top * 2)
    ax.set_xticks(x)
    ax.set_xticklabels([_mpl_text(n) for n in names], rotation=60, ha="right", fontsize=8)
    failed = {str(s) for b in ran.values() for s in _list(b.get("failed_stages"))}
    for label, n in zip(ax.get_xticklabels(), names):
        if n in failed:
            label.set_color(FAIL_COLOUR)
            label.set_fontweight("bold")
    ax.set_ylabel("max relative error (log)")
    ax.set_title("Error per stage vs the PyTorch reference")
    ax.grid(True, which="major", axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _svg(fig, "error per stage")


def exit_histogram_plot(data: dict) -> str | None:
    """How many samples exit after each layer: reference and each backend that ran."""
    series: dict[str, list] = {}
    ref = _list(_dict(data.get("reference")).get("exit_layers"))
    if ref:
        series["reference (pytorch)"] = ref
    for name, b in _backends(data).items():
        if not b.get("skipped") and _list(b.get("exit_layers")):
            series[name] = _list(b.get("exit_layers"))
    if not series:
        return None
    layers = sorted({v for s in series.values() for v in s if isinstance(v, int) and not isinstance(v, bool)})
    has_none = any(v is None for s in series.values() for v in s)
    cats: list = layers + ([None] if has_none else [])
    if not cats:
        return None
    fig = _figure(max(8.0, 0.5 * len(cats) * len(series) ** 0.5 + 2.5), 3.4)
    ax = fig.subplots()
    width = 0.8 / len(series)
    for k, (name, values) in enumerate(series.items()):
        counts = [sum(1 for v in values if v == c) for c in cats]
        xs = [i - 0.4 + width * (k + 0.5) for i in range(len(cats))]
        colour = "#24292f" if k == 0 and name.startswith("reference") else SERIES[(k - 1) % len(SERIES)]
        ax.bar(xs, counts, width=width * 0.95, color=colour, label=_mpl_text(name))
    ax.set_xticks(range(len(cats)))
    ax.set_xticklabels(["no exit" if c is None else str(c) for c in cats])
    ax.set_xlabel("exit after layer (0-based)")
    ax.set_ylabel("samples")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_title("Exit layers (dynamic policy)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _svg(fig, "exit-layer histogram")


LATENCY_PANELS = [("vision_ms", "vision (ms)"), ("prefill_ms", "prefill (ms)"),
                  ("decode_ms_per_token", "decode (ms / token)")]


def latency_plot(data: dict) -> str | None:
    """Vision, prefill and per-token decode latency, without and with the exit, per runner."""
    speed = _dict(data.get("speed"))
    runners = _runners(speed)
    if not any(_number(r.get(f"{key}_{mode}")) is not None
               for r in runners.values() for key, _ in LATENCY_PANELS for mode in ("none", "exit")):
        return None
    has_exit = any(_number(r.get(f"{key}_exit")) is not None for r in runners.values() for key, _ in LATENCY_PANELS)
    modes = [("none", "no exit", "#8c959f")] + (
        [("exit", f"exit after layer {speed.get('exit_layer')}", "#0969da")] if has_exit else [])
    fig = _figure(max(10.0, 1.2 * len(runners) * len(LATENCY_PANELS)), 3.8)
    axes = fig.subplots(1, len(LATENCY_PANELS))
    names = list(runners)
    width = 0.8 / len(modes)
    for ax, (key, title) in zip(axes, LATENCY_PANELS):
        shown: list[float] = []
        for k, (mode, label, colour) in enumerate(modes):
            vals = [_number(runners[n].get(f"{key}_{mode}")) for n in names]
            xs = [i - 0.4 + width * (k + 0.5) for i in range(len(names))]
            bars = ax.bar(xs, [0.0 if v is None else v for v in vals], width=width * 0.95, color=colour,
                          label=_mpl_text(label))
            ax.bar_label(bars, labels=["n/a" if v is None else f"{v:.3g}" for v in vals], fontsize=7, padding=1)
            shown.extend(v for v in vals if v is not None and v > 0)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([_mpl_text(n) for n in names], rotation=20, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        if shown and max(shown) / min(shown) > 30:  # runners far apart: a linear axis hides the fast one
            ax.set_yscale("log")
            ax.set_ylim(min(shown) / 2, max(shown) * 4)
        elif shown:
            ax.set_ylim(0, max(shown) * 1.15)
    axes[0].set_ylabel("milliseconds (median)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", fontsize=8, ncols=len(modes), frameon=False)
    fig.suptitle("Latency breakdown per runner (medians)", x=0.02, ha="left")
    fig.subplots_adjust(wspace=0.3)
    return _svg(fig, "latency breakdown")


# ---------------------------------------------------------------------------- sections


def _verdict(data: dict) -> str:
    passed = data.get("passed")
    word, cls = ("PASSED", "pass") if passed is True else ("FAILED", "fail") if passed is False else (NA, "skip")
    backends = _backends(data)
    facts = [
        f"precision <b>{_esc(data.get('precision', NA))}</b>",
        f"<b>{_esc(data.get('samples', NA))}</b> samples",
        f"exit policy <b>{_esc(data.get('policy', NA))}</b>",
        f"backends: {', '.join(_esc(n) for n in backends) or 'none'}",
    ]
    out = [f'<section id="verdict" class="verdict {cls}"><div class="word">{word}</div>',
           f'<p class="facts">{" · ".join(facts)}</p>']
    reasons = []
    limits = _dict(data.get("thresholds"))
    for name, b in backends.items():
        if b.get("skipped") or b.get("passed") is not False:
            continue
        checks = _dict(b.get("checks"))
        failed_checks = [c for c, ok in checks.items() if ok is False]
        items = []
        for c in failed_checks:
            items.append(f"<li>failed check <b>{_esc(CHECK_NAMES.get(c, c))}</b>: {_check_detail(c, b, limits)}</li>")
        stages = _dict(b.get("stages"))
        for s in _list(b.get("failed_stages")):
            e = _dict(stages.get(s))
            if e.get("missing"):
                detail = "missing from the backend's output"
            elif e.get("non_finite"):
                detail = "holds NaN or Inf"
            else:
                detail = (f"max rel {_fmt(e.get('max_rel'))} (limit {_fmt(limits.get('stage_max_rel'))}), "
                          f"min cosine {_fmt(e.get('min_cosine'), '.7g')} (limit {_fmt(limits.get('min_cosine'), '.7g')})")
            items.append(f'<li>stage over threshold <b class="stage">{_esc(s)}</b>: {detail}</li>')
        if not items:
            items.append("<li>failed (no failing check recorded)</li>")
        reasons.append(f'<div class="why"><b>{_esc(name)}</b> failed:<ul>{"".join(items)}</ul></div>')
    if passed is False and not reasons:
        skipped = [n for n, b in backends.items() if b.get("skipped")]
        reasons.append("<div class=\"why\">no backend was compared with the reference"
                       + (f" (skipped: {', '.join(_esc(n) for n in skipped)})" if skipped else "") + ".</div>")
    out.extend(reasons)
    out.append("</section>")
    return "\n".join(out)


def _check_detail(check: str, b: dict, limits: dict) -> str:
    if check == "logits":
        return (f"max |diff| {_fmt(b.get('logits_max_abs_diff'))} (limit {_fmt(limits.get('logits_max_abs'))}), "
                f"min cosine {_fmt(b.get('logits_min_cosine'), '.7g')} (limit {_fmt(limits.get('min_cosine'), '.7g')})")
    if check == "stages":
        return f"{len(_list(b.get('failed_stages')))} stage(s) over threshold (listed below)"
    if check == "finite":
        return (f"NaN or Inf first in stage {_esc(b.get('first_non_finite_stage'))} "
                f"(all: {_esc(', '.join(str(s) for s in _list(b.get('non_finite_stages'))))})")
    if check == "exit_layers":
        return (f"agreement {_pct(b.get('exit_layer_agreement'))} (required {_pct(limits.get('exit_layer_agreement'))}), "
                f"{len(_list(b.get('exit_disagreements')))} real disagreement(s)")
    if check == "tokens":
        return f"agreement {_pct(b.get('token_agreement'))} (required {_pct(limits.get('token_agreement'))})"
    return "failed"


def _records_table(records: list, empty: str) -> str:
    if not records:
        return f"<span class=\"muted\">{_esc(empty)}</span>"
    rows = []
    for r in map(_dict, records):
        layers = _list(r.get("near_tie_layers"))
        rows.append(f"<tr><td>{_esc(r.get('sample', NA))}</td><td>{_layer(r.get('reference'))}</td>"
                    f"<td>{_layer(r.get('backend'))}</td>"
                    f"<td>{', '.join(_esc(x) for x in layers) or '—'}</td></tr>")
    return ("<table class=\"inner\"><tr><th>sample</th><th>reference exit</th><th>backend exit</th>"
            f"<th>near-tie layers</th></tr>{''.join(rows)}</table>")


def _backend_section(name: str, b: dict, limits: dict) -> str:
    head = f'<h3>{_esc(name)} {_status(b.get("passed"), b.get("skipped"))}</h3>'
    if b.get("skipped"):
        return (f'<div class="backend skipped" id="backend-{_esc(name)}">{head}'
                f'<p>Skipped: <span class="reason">{_esc(b["skipped"])}</span></p></div>')
    checks = _dict(b.get("checks"))

    def ok(check):
        v = checks.get(check)
        return "" if v is None else (' class="ok"' if v else ' class="bad"')

    near, dis = _list(b.get("near_ties")), _list(b.get("exit_disagreements"))
    rows = [
        ("result", _status(b.get("passed")), ""),
        ("exit-layer agreement", _pct(b.get("exit_layer_agreement")), ok("exit_layers")),
        ("logits max |diff|", _fmt(b.get("logits_max_abs_diff")), ok("logits")),
        ("logits min cosine", _fmt(b.get("logits_min_cosine"), ".7g"), ok("logits")),
        ("token agreement", _pct(b.get("token_agreement")), ok("tokens")),
        ("stages over threshold",
         ", ".join(f'<b class="stage">{_esc(s)}</b>' for s in _list(b.get("failed_stages"))) or "none", ok("stages")),
        (f"near ties ({len(near)})", _records_table(near, "none"), ""),
        (f"real exit disagreements ({len(dis)})", _records_table(dis, "none"), ' class="bad"' if dis else ""),
        ("exit layers", ", ".join(_layer(v) for v in _list(b.get("exit_layers"))) or NA, ""),
        ("seconds (probe + generate)", _fmt(b.get("seconds"), ".2f"), ""),
    ]
    body = "".join(f"<tr><th>{_esc(k)}</th><td{cls}>{v}</td></tr>" for k, v, cls in rows)
    stage_rows = []
    failed = {str(s) for s in _list(b.get("failed_stages"))}
    stages = _dict(b.get("stages"))
    for _, s in sorted(enumerate(map(str, stages)), key=_stage_key):
        e = _dict(stages.get(s))
        cls = ' class="bad"' if s in failed else ""
        if e.get("missing"):
            stage_rows.append(f"<tr{cls}><td>{_esc(s)}</td><td colspan=\"3\">missing</td></tr>")
        else:
            stage_rows.append(f"<tr{cls}><td>{_esc(s)}</td><td>{_fmt(e.get('max_abs'))}</td>"
                              f"<td>{_fmt(e.get('max_rel'))}</td><td>{_fmt(e.get('min_cosine'), '.7g')}</td></tr>")
    details = ""
    if stage_rows:
        opened = " open" if failed else ""
        details = (f"<details{opened}><summary>errors per stage ({len(stage_rows)} stages)</summary>"
                   "<table class=\"stages\"><tr><th>stage</th><th>max |diff|</th><th>max rel</th>"
                   f"<th>min cosine</th></tr>{''.join(stage_rows)}</table></details>")
    return (f'<div class="backend" id="backend-{_esc(name)}">{head}<table class="kv">{body}</table>'
            f"{details}</div>")


def _speed_section(data: dict) -> str:
    speed = _dict(data.get("speed"))
    if not speed:
        return "<p class=\"muted\">No speed measurements in this report.</p>"
    analytic = speed.get("analytic_speedup")
    full, saved = _number(speed.get("kv_bytes_full")), _number(speed.get("kv_bytes_saved"))
    share = f" ({_pct(saved / full)} of the cache)" if full and saved is not None else ""
    facts = [
        ("exit layer measured", _layer(speed.get("exit_layer")) if "exit_layer" in speed else NA),
        ("visual tokens", _esc(speed.get("visual_tokens", NA))),
        ("text tokens", _esc(speed.get("text_tokens", NA))),
        ("KV cache without exit", _bytes(full)),
        ("KV bytes saved by the exit", _bytes(saved) + share),
        ("analytic prefill speed-up (FLOPs ratio)", _fmt(analytic, ".2f", "×")),
    ]
    out = ["<table class=\"kv\">" + "".join(f"<tr><th>{_esc(k)}</th><td>{v}</td></tr>" for k, v in facts) + "</table>"]
    runners = _runners(speed)
    if runners:
        rows = []
        for name, r in runners.items():
            rows.append(
                f"<tr><td>{_esc(name)}</td><td>{_fmt(r.get('vision_ms_none'), '.2f')}</td>"
                f"<td>{_fmt(r.get('vision_ms_exit'), '.2f')}</td>"
                f"<td>{_fmt(r.get('prefill_ms_none'), '.2f')}</td><td>{_fmt(r.get('prefill_ms_exit'), '.2f')}</td>"
                f"<td>{_fmt(r.get('decode_ms_per_token_none'), '.2f')}</td>"
                f"<td>{_fmt(r.get('decode_ms_per_token_exit'), '.2f')}</td>"
                f"<td>{_fmt(r.get('prefill_speedup'), '.2f', '×')}</td><td>{_fmt(analytic, '.2f', '×')}</td>"
                f"<td>{_pct(r.get('efficiency'))}</td></tr>")
        out.append("<table class=\"grid speed\"><tr><th>runner</th><th>vision ms (no exit)</th><th>vision ms (exit)</th><th>prefill ms (no exit)</th>"
                   "<th>prefill ms (exit)</th><th>decode ms/token (no exit)</th><th>decode ms/token (exit)</th>"
                   "<th>prefill speed-up</th><th>analytic speed-up</th><th>efficiency</th></tr>"
                   + "".join(rows) + "</table>")
        out.append("<p class=\"note\">Medians after one warm-up. Efficiency = measured prefill speed-up / "
                   "analytic FLOPs ratio.</p>")
    return "\n".join(out)


def _thresholds_section(data: dict) -> str:
    limits = _dict(data.get("thresholds"))
    if not limits:
        return "<p class=\"muted\">No thresholds recorded.</p>"
    meaning = {
        "logits_max_abs": "final logits: max |diff| at most",
        "stage_max_rel": "every stage: max |diff| / max |reference| at most",
        "min_cosine": "logits and stages: cosine similarity at least",
        "near_tie": "router margin below which an exit disagreement is a near tie",
        "token_agreement": "generated tokens: mean agreement at least",
        "exit_layer_agreement": "exit layers: agreement (near ties excused) at least",
    }
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_fmt(v, '.6g')}</td><td class=\"muted\">{_esc(meaning.get(k, ''))}</td></tr>"
                   for k, v in limits.items())
    return f"<table class=\"grid\">{rows}</table>"


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:24px auto;max-width:1100px;
 color:#24292f;padding:0 16px;line-height:1.4}
h1{font-size:22px;margin:0 0 12px} h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #d0d7de}
h3{font-size:16px;margin:16px 0 6px}
.verdict{border-radius:8px;padding:14px 20px;border:2px solid}
.verdict.pass{background:#dafbe1;border-color:#1a7f37} .verdict.fail{background:#ffebe9;border-color:#cf222e}
.verdict.skip{background:#f6f8fa;border-color:#6e7781}
.verdict .word{font-size:44px;font-weight:800;letter-spacing:2px}
.verdict.pass .word{color:#1a7f37} .verdict.fail .word{color:#cf222e} .verdict.skip .word{color:#6e7781}
.verdict .facts{margin:4px 0;font-size:15px} .why{margin-top:8px} .why ul{margin:4px 0}
.badge{font-size:12px;font-weight:700;padding:2px 8px;border-radius:10px;color:#fff;vertical-align:middle}
.badge.pass{background:#1a7f37} .badge.fail{background:#cf222e} .badge.skip{background:#6e7781}
table{border-collapse:collapse;margin:6px 0;font-size:14px}
th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:left;vertical-align:top}
table.kv th{background:#f6f8fa;width:240px;font-weight:600}
table.grid th{background:#f6f8fa}
td.ok{color:#1a7f37} td.bad,tr.bad td{color:#cf222e;font-weight:600}
.stage{font-family:ui-monospace,monospace} .muted{color:#6e7781} .reason{font-style:italic}
.plot{margin:10px 0;overflow-x:auto} .plot svg{max-width:100%;height:auto}
.backend{margin-bottom:14px} details{margin:6px 0} .note{font-size:13px;color:#57606a}
"""


def render_html(data: dict) -> str:
    """The whole page, as text."""
    data = _dict(data)
    limits = _dict(data.get("thresholds"))
    backends = _backends(data)
    passed = data.get("passed")
    title = f"DyVTE parity report — {'PASSED' if passed is True else 'FAILED' if passed is False else NA}"
    plots = [
        ("Error per stage", stage_error_plot, "No backend produced stage errors (all skipped)."),
        ("Exit layers", exit_histogram_plot, "No exit layers recorded."),
        ("Latency", latency_plot, "No latency measurements in this report."),
    ]
    plot_html = []
    for heading, draw, empty in plots:
        svg = draw(data)
        plot_html.append(f"<h3>{_esc(heading)}</h3>" + (svg or f"<p class=\"muted\">{_esc(empty)}</p>"))
    ref = _dict(data.get("reference"))
    ref_line = (f"<p>Reference (PyTorch): exit layers {', '.join(_layer(v) for v in _list(ref.get('exit_layers'))) or NA}; "
                f"{_fmt(ref.get('seconds'), '.2f')} s.</p>")
    json_line = f"<p class=\"note\">Machine-readable: {_esc(data['json'])}</p>" if data.get("json") else ""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(title)}</title><style>{CSS}</style></head><body>",
        "<h1>DyVTE parity report: PyTorch reference vs exported backends</h1>",
        _verdict(data),
        "<h2>Backends</h2>",
        ref_line,
        "".join(_backend_section(n, b, limits) for n, b in backends.items()) or "<p class=\"muted\">No backends.</p>",
        "<h2>Plots</h2>",
        "".join(plot_html),
        "<h2>Speed</h2>",
        _speed_section(data),
        "<h2>Thresholds</h2>",
        f"<p>Precision {_esc(data.get('precision', NA))}; errors are measured on float32 copies.</p>",
        _thresholds_section(data),
        json_line,
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def write_html(data: dict, path) -> Path:
    """Write the page to `path` (folders created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(data), encoding="utf-8")
    return path
