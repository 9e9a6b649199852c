"""The owner's view in the HTML privacy report (`vgw report --html`): times in the device's local time zone,
consent versions as dates, apps by name, and a timeline of what was shared when as inline SVG (no script, no
font or image to load: the page stays self-contained). Pure formatting of :func:`vgw.ops.report.build_report`'s
dict; reads nothing but the clock's time zone.
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterable, Mapping
from typing import Any

from vgw.base.timefmt import local_text, valid_time

_LOCAL_FORMAT = "%-d %b %Y, %H:%M"
_LOCAL_SECOND = "%-d %b %Y, %H:%M:%S"


def local_when(t: Any) -> str:
    """A time as the owner reads it: this device's local time zone (set when the Pi was installed)."""
    return local_text(t, _LOCAL_FORMAT)


def local_second(t: Any) -> str:
    """:func:`local_when` to the second: when a permission began or ended and when data left, where a minute
    would blur a withdrawal and the data that came before it."""
    return local_text(t, _LOCAL_SECOND)


def zone_name(t: Any) -> str:
    return local_text(t if valid_time(t) else time.time(), "%Z (UTC%z)")


def version_text(ver: Any) -> str:
    """A consent version as the owner reads it: "version of 2 Dec 2026, 14:05" when the number is a time (the
    consent service numbers versions by Unix time in ms, docs/fleet.md; seconds are recognised too), else
    "version 7"."""
    if isinstance(ver, bool) or not isinstance(ver, int):
        return "version ?"
    for scale in (1000, 1):
        t = ver / scale
        if 1_000_000_000 <= t <= 4_102_444_800:  # 2001-09-09 .. 2100-01-01: a plausible issue date
            return f"version of {local_when(t)}"
    return f"version {ver}"


def app_name(controller: Any) -> str:
    """An app's name from its controller id: "com.example.fleet" -> "Fleet (example.com)"; other text as is."""
    if not isinstance(controller, str) or not controller:
        return "an unnamed app"
    parts = controller.split(".")
    if len(parts) >= 3 and all(p.replace("-", "").isalnum() for p in parts):
        name = " ".join(w.capitalize() for w in parts[-1].replace("_", "-").split("-"))
        return f"{name} ({'.'.join(reversed(parts[:-1]))})"
    return controller


def purpose_text(purpose: Any) -> str:
    return str(purpose).replace("-", " ").replace("_", " ") if purpose else ""


def _times(values: Iterable[Any]) -> list[float]:
    return [float(t) for t in values if isinstance(t, int | float) and valid_time(t)]


def timeline_svg(report: Mapping[str, Any]) -> str:
    """What was shared when, per app and scope, as inline SVG (no script, no font or image to load).

    Each row is one scope of one grant. For each period the scope was in force: a light bar from its start to its
    end (or now), and inside it a dark bar from the first to the last message the app received in that period,
    only where readings were sent; a red mark where data were deleted in the car. Nothing is drawn where nothing
    happened: a withdrawn stretch between two periods stays empty. "" when no time is known.
    """
    end = report.get("generated")
    rows: list[tuple[str, str, list[Mapping[str, Any]], list[Any], bool]] = []
    for g in report["grants"]:
        for sc in g["scopes"]:
            rows.append((app_name(g["controller"]), sc["label"], list(sc.get("periods") or []),
                         [d.get("at") for d in g["deleted"]], bool(sc.get("in_force"))))
    times = _times(t for r in rows for p in r[2] for t in (p.get("from"), p.get("to"), p.get("first_sent"),
                                                          p.get("last_sent")))
    times += _times(t for r in rows for t in r[3])
    if not rows or not times or not _times([end]):
        return ""
    t0, t1 = min(times), max(max(times), _times([end])[0])
    span = max(t1 - t0, 60.0)
    # Each row: its label on one line, the bar under it across the full width (long labels never collide).
    # 520 units wide, two legend entries a line: the page scales it down to a phone's width (report.py's CSS)
    # with the text still readable, and nothing (the end time, a deletion mark) hides off the right edge.
    label_w, bar_w, row_h, top = 0, 520, 40, 30
    width, height = label_w + bar_w + 4, top + row_h * len(rows) + 52

    def x(t: Any) -> float:
        return float(label_w + bar_w * (min(max(t, t0), t1) - t0) / span)

    e = html.escape
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" role="img" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" aria-labelledby="tl-title tl-desc" font-family="sans-serif" '
           'font-size="14">',
           '<title id="tl-title">What was shared when</title>',
           '<desc id="tl-desc">One row per app and kind of data: light while the permission stood, dark from '
           "the first to the last message the app received in that time, red where data were deleted in the "
           "car.</desc>",
           f'<text x="{label_w}" y="16" fill="#333">{e(local_when(t0))}</text>',
           f'<text x="{label_w + bar_w}" y="16" text-anchor="end" fill="#333">{e(local_when(t1))}</text>']
    for i, (app, scope, periods, deletions, active) in enumerate(rows):
        y = top + i * row_h
        out.append(f'<text x="0" y="{y + 12}" fill="#1a1a1a">{e(app)}: {e(scope)}</text>')
        y += 18  # the bar, under its label
        out.append(f'<rect x="{label_w}" y="{y + 4}" width="{bar_w}" height="{row_h - 26}" fill="#f3f3f3"/>')
        for p in periods:
            start, stop = p.get("from"), p.get("to")
            if not valid_time(start):
                continue
            x0, x1 = x(start), x(stop if valid_time(stop) else t1)
            fill = "#b7e1c1" if stop is None and active else "#d6d6d6"
            out.append(f'<rect class="permission" data-row="{i}" x="{x0:.2f}" y="{y + 4}" '
                       f'width="{max(x1 - x0, 2):.2f}" '
                       f'height="{row_h - 26}" fill="{fill}"><title>permission {e(local_second(start))} to '
                       f'{e(local_second(stop) if valid_time(stop) else "now")}</title></rect>')
            first, last = p.get("first_sent"), p.get("last_sent")
            if (p.get("samples_sent") or 0) > 0 and valid_time(first) and valid_time(last):
                # At least 1 unit wide so a single message shows, but never past the period's own end.
                s0, s1 = x(first), x(last)
                w = min(max(s1 - s0, 1.0), max(x1 - s0, 0.0))
                out.append(f'<rect class="sent" data-row="{i}" x="{s0:.2f}" y="{y + 6}" width="{w:.2f}" '
                           f'height="{row_h - 30}" '
                           f'fill="#1f5fa8"><title>sent {e(local_second(first))} to {e(local_second(last))}'
                           "</title></rect>")
        for d in deletions:
            if valid_time(d):
                out.append(f'<rect x="{x(d) - 1.5:.1f}" y="{y + 1}" width="3" height="{row_h - 20}" fill="#b00020">'
                           f"<title>deleted in the car {e(local_second(d))}</title></rect>")
    ly = top + row_h * len(rows) + 8
    for j, (fill, text) in enumerate((("#b7e1c1", "permission given"), ("#d6d6d6", "permission ended"),
                                      ("#1f5fa8", "data sent"), ("#b00020", "deleted in the car"))):
        lx, lyj = (j % 2) * 260, ly + (j // 2) * 20
        out.append(f'<rect x="{lx}" y="{lyj}" width="14" height="10" fill="{fill}"/>'
                   f'<text x="{lx + 20}" y="{lyj + 10}" fill="#333">{text}</text>')
    out.append("</svg>")
    return "\n".join(out)


WITHDRAWN_TEXT = (
    "When you withdraw a permission (or it expires), the car stops collecting for that app at once and deletes "
    "everything it still holds for it that was not yet sent: it first destroys the encryption key, so nothing "
    "left on the car can be read again. The car then signs an erasure receipt that says what it deleted and "
    "when; the app and you can check that receipt. What the app had already received before that is in the "
    "app's hands: withdrawing does not pull it back, and deleting it is the app's duty (you can ask the app "
    "to, and the receipt shows when the sharing ended)."
)
