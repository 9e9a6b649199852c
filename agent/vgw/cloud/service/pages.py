"""The service's HTML, server-rendered with Jinja (autoescaped; no script, no external font or image):
sign-in, consent, the owner's page, errors. Each scope is named in the owner's words, the same texts as the
owner's report (:data:`vgw.contract.rules.describe.SCOPE_LABELS`,
:func:`vgw.contract.rules.describe.describe_grant`)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from flask import render_template_string

from vgw.contract.consent.model import DEFAULT_LIMITS
from vgw.contract.rules.describe import SCOPE_LABELS, describe_grant

__all__ = ["consent_page", "error_page", "login_page", "owner_page", "scope_sentences", "when"]

# What the car enforces when a grant sets no limit of its own (README "Telemetry envelope": privacy defaults)
_CAR_LIMITS = {s: {k: v for k, v in (("max_hz", hz), ("precision_m", p)) if v} for s, (hz, p) in DEFAULT_LIMITS.items()}


def scope_sentences(scopes: Sequence[str]) -> list[str]:
    """One sentence per scope: what the app receives, limits included (the owner's report's words)."""
    return describe_grant(list(scopes), [], _CAR_LIMITS)


def when(t: float | None) -> str:
    return time.strftime("%-d %b %Y, %H:%M UTC", time.gmtime(t)) if t else ""


_BASE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }} - vgw consent</title>
<style>
body{font:16px/1.5 system-ui,sans-serif;color:#1b1f24;background:#f4f6f8;margin:0}
main{max-width:42rem;margin:2rem auto;padding:0 1rem}
header{background:#123;color:#fff;padding:.6rem 1rem;display:flex;justify-content:space-between;align-items:center}
header b{letter-spacing:.02em}
.card{background:#fff;border:1px solid #d8dee4;border-radius:8px;padding:1rem 1.25rem;margin:1rem 0}
h1{font-size:1.45rem;line-height:1.3;margin:.2rem 0 1rem}
h2{font-size:1.1rem;margin:1.6rem 0 .4rem} .card>h2:first-child{margin-top:0}
ul{padding-left:1.2rem} li{margin:.25rem 0}
.muted{color:#57606a;font-size:.92rem}
.ok{color:#1a7f37;font-weight:600} .pending{color:#9a6700;font-weight:600} .bad{color:#cf222e;font-weight:600}
button{font:inherit;padding:.5rem 1.3rem;border-radius:6px;border:1px solid #8c959f;background:#fff;cursor:pointer}
button.primary{background:#1f6feb;border-color:#1f6feb;color:#fff}
button.danger{color:#cf222e;border-color:#cf222e}
.row{display:flex;gap:.75rem;margin-top:1rem}
label{display:block;margin:.6rem 0 .2rem;font-weight:600}
input[type=text],input[type=password]{font:inherit;width:100%;box-sizing:border-box;padding:.45rem;
border:1px solid #8c959f;border-radius:6px}
table{border-collapse:collapse;width:100%} td,th{text-align:left;padding:.3rem .4rem;border-bottom:1px solid #d8dee4;
vertical-align:top} th{font-size:.9rem;color:#57606a}
code{font-size:.85rem} td:first-child{white-space:nowrap}
</style></head>
<body><header><b>vgw &middot; your car's data</b>{% if owner %}<form method="post" action="/logout">
<input type="hidden" name="csrf_token" value="{{ csrf }}"><span>{{ owner }}</span>
<button type="submit">Sign out</button></form>{% endif %}</header>
<main>{{ body|safe }}</main></body></html>"""

_LOGIN = """<div class="card"><h1>Sign in</h1>
<p class="muted">Sign in to review who may read data from your car.</p>
{% if error %}<p class="bad" role="alert">{{ error }}</p>{% endif %}
<form method="post" action="/login">
<input type="hidden" name="csrf_token" value="{{ csrf }}"><input type="hidden" name="next" value="{{ next }}">
<label for="username">User name</label>
<input type="text" id="username" name="username" autocomplete="username" required>
<label for="password">Password</label>
<input type="password" id="password" name="password" autocomplete="current-password" required>
<div class="row"><button class="primary" type="submit">Sign in</button></div></form></div>"""

_CONSENT = """<div class="card"><h1>{{ app.name }} asks to read data from your car</h1>
<p><b>Purpose:</b> {{ app.purpose }}</p>
<p class="muted">Car <code>{{ device }}</code> &middot; app id <code>{{ app.client_id }}</code></p>
<h2>What {{ app.name }} will receive</h2>
<ul>{% for s in sentences %}<li>{{ s }}</li>{% endfor %}</ul>
<h2>What your car does</h2>
<ul><li>Your car checks this permission itself and sends only these readings, encrypted so that only
{{ app.name }} can read them.</li>
<li>Nothing else leaves the car for {{ app.name }}.</li>
<li>You can withdraw at any time on your page. The car then stops, deletes what it has not sent yet, and
sends you a signed receipt that it did.</li></ul>
<form method="post">
<input type="hidden" name="csrf_token" value="{{ csrf }}">
<div class="row"><button class="primary" type="submit" name="decision" value="allow">Allow</button>
<button type="submit" name="decision" value="deny">Deny</button></div></form></div>"""

_OWNER = """<h1>Apps with access to your car</h1>
<p class="muted">Car <code>{{ device }}</code>.
{% if doc %}Consent document signed {{ when(doc.signed_at) }} (version {{ doc.ver }}):
{% if applied %}<span class="ok">applied by your car</span> {{ when(applied.iat) }} (its signed receipt verified).
{% elif rejected %}<span class="bad">refused by your car</span>: {{ rejected.reason }}.
{% elif doc.acked_at %}<span class="ok">delivered to the broker</span>; your car applies it when it is online.
{% else %}<span class="pending">pending</span>: the broker has not acknowledged it yet; the service keeps trying.
{% endif %}{% else %}No consent document yet.{% endif %}</p>
{% for item in active %}<div class="card"><h2>{{ item.app_name }}</h2>
<p>{{ item.purpose }}</p><ul>{% for s in item.sentences %}<li>{{ s }}</li>{% endfor %}</ul>
<p class="muted">Allowed since {{ when(item.grant.granted_at) }} &middot; grant <code>{{ item.grant.id }}</code></p>
<form method="post" action="/withdraw"><input type="hidden" name="csrf_token" value="{{ csrf }}">
<input type="hidden" name="grant" value="{{ item.grant.id }}">
<button class="danger" type="submit">Withdraw</button></form></div>
{% else %}<div class="card"><p>No app can read data from your car.</p></div>{% endfor %}
{% if withdrawn %}<h2>Withdrawn</h2>{% for item in withdrawn %}<div class="card">
<b>{{ item.app_name }}</b>: {{ item.labels|join(", ") }}
<p class="muted">Allowed {{ when(item.grant.granted_at) }}, withdrawn {{ when(item.grant.withdrawn_at) }}.</p>
{% if item.receipt %}<p><span class="ok">Erasure receipt from your car, signature verified</span>:
the car deleted {{ item.receipt.batches_deleted }} stored batch(es) not yet sent and destroyed this app's data
key. Received {{ when(item.receipt.received_at) }}, for consent version {{ item.receipt.ver }}.</p>
{% else %}<p><span class="pending">Waiting for your car's erasure receipt</span>: the car sends it once it has
applied the withdrawal.</p>{% endif %}</div>{% endfor %}{% endif %}
<h2>History</h2><div class="card"><table><tr><th>When</th><th>App</th><th>What</th></tr>
{% for h in history %}<tr><td>{{ when(h.at) }}</td><td>{{ h.app_name }}</td>
<td>{{ h.event }}: {{ h.labels|join(", ") }}</td></tr>
{% else %}<tr><td colspan="3">Nothing yet.</td></tr>{% endfor %}</table></div>"""

_ERROR = """<div class="card"><h1>{{ heading }}</h1><p>{{ message }}</p></div>"""


def _page(title: str, body_template: str, *, owner: str | None = None, csrf: str = "", **ctx: Any) -> str:
    body = render_template_string(body_template, csrf=csrf, when=when, **ctx)
    return render_template_string(_BASE, title=title, body=body, owner=owner, csrf=csrf)


def login_page(csrf: str, next_url: str, error: str | None = None) -> str:
    return _page("Sign in", _LOGIN, csrf=csrf, next=next_url, error=error)


def consent_page(csrf: str, owner: str, app: Any, device: str, scopes: Sequence[str]) -> str:
    return _page(f"{app.name} asks for access", _CONSENT, owner=owner, csrf=csrf, app=app, device=device,
                 sentences=scope_sentences(scopes))


def owner_page(csrf: str, owner: str, device: str, **ctx: Any) -> str:
    return _page("Your car's data", _OWNER, owner=owner, csrf=csrf, device=device, **ctx)


def error_page(heading: str, message: str, owner: str | None = None, csrf: str = "") -> str:
    return _page(heading, _ERROR, owner=owner, csrf=csrf, heading=heading, message=message)


def labels(scopes: Sequence[str]) -> list[str]:
    return [SCOPE_LABELS.get(s, s) for s in scopes]
