"""The explorer's schedules and its model of consent (tests/explore.py runs them, tests/explore_oracle.py judges).

A schedule is a list of steps, plain dicts so a failing one prints as JSON and replays from that text. A seed
makes the list (:func:`generate`); shrinking removes steps, so every step must make sense in any state
(a step that cannot apply is a no-op: a narrowing of a grant not in force, a broker start of a running one).

Steps (``op``):

- consent: ``grant`` (new grant, or new scopes: a wider grant gets a new recipient key, a narrower one keeps
  it: a narrowing), ``revoke``, ``revoke_all``, ``rotate`` (same scopes, new recipient key), ``burst`` (several
  of these published back to back); each becomes the next signed version, published retained on every broker
  that is up (live to a connected agent, retained for one that connects later);
- ``local``: the newest document applied with `vgw consent apply` while the agent is down (no network);
- the cloud misbehaving: ``forge`` (a newer version signed by an untrusted key), ``replay`` (an older genuine
  version published again), ``skew`` (the cloud's clock steps by up to +-250 s for the next documents' ``iat``);
- the link: ``down`` / ``up`` of broker A or B (stopped and started; with one down the agent fails over);
- the process: ``kill`` (SIGKILL), ``stop`` (SIGTERM), ``start``, ``restart`` (SIGTERM, then start);
- storage: ``fill`` (the state file system full), ``free``; ``damage`` (the consent cache truncated, garbled or
  deleted: the agent is killed, the file damaged, the agent started);
- time passing: ``wait`` (seconds), ``settle`` (until the agent reports the newest version, bounded).

An *incarnation* is one grant id under one recipient key. Within an incarnation scopes only shrink (a wider
grant is a new incarnation), so "the first version that withdrew scope s of incarnation I" is well defined:
a sample of s sealed to I's key is withdrawn data once the device could know any version >= that one.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

from vgw_sim.cloud import RecipientKey, SigningKey, consent_claims, grant, sign_consent

Step = dict[str, Any]

# Grant ids and the scopes each may hold (signals the demo trace carries, at different rates).
POOL: dict[str, tuple[str, ...]] = {
    "g-loc": ("read_location", "read_compass"),
    "g-drive": ("read_speedometer", "read_odometer", "read_fuel"),
    "g-diag": ("read_diagnostics", "read_thermometer"),
}
# Location and compass at a usable rate (the privacy defaults would give one sample per 5 s).
LIMITS = {"read_location": {"max_hz": 5.0, "precision_m": 10.0}, "read_compass": {"max_hz": 5.0}}
SKEW_S = 250  # the verifier allows iat up to 300 s ahead of the device's clock


@dataclass
class Incarnation:
    gid: str
    n: int
    key: RecipientKey
    scopes: frozenset[str]  # as first granted
    since: int  # the version that granted it
    withdrawn: dict[str, int] = field(default_factory=dict)  # scope -> first version without it
    ended: int | None = None  # the version that revoked it or replaced its key

    @property
    def name(self) -> str:
        return f"{self.gid}#{self.n}"

    def withdrawn_at(self, scope: str) -> int:
        """The first version under which ``scope`` of this incarnation is withdrawn (0: never granted)."""
        if scope not in self.scopes:
            return 0
        candidates = [v for v in (self.withdrawn.get(scope), self.ended) if v is not None]
        return min(candidates) if candidates else 1 << 30


@dataclass(frozen=True)
class Doc:
    ver: int
    token: str
    grants: dict[str, tuple[Incarnation, frozenset[str]]]  # gid -> (incarnation, scopes in this version)


class ConsentModel:
    """The cloud's consent service for one device: versions, incarnations, the documents it signed."""

    def __init__(self, device: str, signer: SigningKey, forger: SigningKey) -> None:
        self.device = device
        self.signer = signer
        self.forger = forger
        self.ver = 0
        self.skew = 0
        self.current: dict[str, tuple[Incarnation, frozenset[str]]] = {}
        self.incarnations: list[Incarnation] = []
        self.docs: dict[int, Doc] = {}
        self.by_token: dict[str, int] = {}  # genuine token -> version

    @property
    def latest(self) -> Doc | None:
        return self.docs.get(self.ver)

    def genuine_ver(self, token: str) -> int:
        """The version of a document this service signed; 0 for anything else (forged, empty)."""
        return self.by_token.get(token, 0)

    def keys_of(self, gid: str) -> list[Incarnation]:
        return [i for i in reversed(self.incarnations) if i.gid == gid]

    def first(self, grants: dict[str, list[str]]) -> Doc:
        """Version 1: ``grants`` ({id: scopes}), each a new incarnation."""
        return self._sign({gid: (self._incarnation(gid, frozenset(sc)), frozenset(sc)) for gid, sc in grants.items()})

    def change(self, step: Step) -> Doc | None:
        """The next version for a consent step, or None when the step changes nothing here."""
        new = dict(self.current)
        op, gid = step["op"], step.get("g")
        if op == "grant":
            scopes = frozenset(step["scopes"]) & frozenset(POOL[gid])
            if not scopes:
                return None
            held = new.get(gid)
            if held is not None and scopes == held[1]:
                return None
            if held is not None and scopes < held[1]:
                new[gid] = (held[0], scopes)  # a narrowing: same recipient
            else:
                new[gid] = (self._incarnation(gid, scopes), scopes)
        elif op == "rotate":
            if gid not in new:
                return None
            new[gid] = (self._incarnation(gid, new[gid][1]), new[gid][1])
        elif op == "revoke":
            if gid not in new:
                return None
            del new[gid]
        elif op == "revoke_all":
            if not new:
                return None
            new = {}
        else:
            raise ValueError(f"not a consent step: {op}")
        return self._sign(new)

    def _incarnation(self, gid: str, scopes: frozenset[str]) -> Incarnation:
        inc = Incarnation(gid, sum(i.gid == gid for i in self.incarnations) + 1, RecipientKey.generate(), scopes,
                          since=self.ver + 1)
        self.incarnations.append(inc)
        return inc

    def _sign(self, new: dict[str, tuple[Incarnation, frozenset[str]]]) -> Doc:
        self.ver += 1
        ver = self.ver
        for gid, (inc, scopes) in self.current.items():
            kept = new.get(gid)
            if kept is None or kept[0] is not inc:
                inc.ended = ver
            else:
                for s in scopes - kept[1]:
                    inc.withdrawn.setdefault(s, ver)
        self.current = new
        token = self._token(ver, new, self.signer)
        doc = Doc(ver, token, dict(new))
        self.docs[ver] = doc
        self.by_token[token] = ver
        return doc

    def _token(self, ver: int, grants: dict[str, tuple[Incarnation, frozenset[str]]], key: SigningKey) -> str:
        gs = [grant(gid, sorted(scopes), inc.key,
                    limits={s: LIMITS[s] for s in scopes if s in LIMITS} or None)
              for gid, (inc, scopes) in sorted(grants.items())]
        iat = int(time.time()) + self.skew
        return sign_consent(consent_claims(self.device, ver, gs, iat=iat, exp=iat + 86400), key)

    def forged(self) -> str:
        """A newer version granting everything, signed by a key the agent does not trust."""
        grants = {gid: (Incarnation(gid, 0, RecipientKey.generate(), frozenset(sc), 0), frozenset(sc))
                  for gid, sc in POOL.items()}
        return self._token(self.ver + 1, grants, self.forger)


# ---------------------------------------------------------------- generation

_WEIGHTS: dict[str, int] = {
    "grant": 10, "revoke": 9, "revoke_all": 2, "rotate": 3, "burst": 4, "local": 3, "forge": 2, "replay": 2,
    "skew": 2, "down": 6, "up": 6, "kill": 5, "stop": 2, "start": 6, "restart": 2, "fill": 4, "free": 4, "damage": 3,
    "wait": 12, "settle": 6,
}


def _consent_step(rng: random.Random) -> Step:
    op = rng.choices(["grant", "revoke", "rotate", "revoke_all"], [10, 9, 3, 1])[0]
    if op == "revoke_all":
        return {"op": op}
    gid = rng.choice(sorted(POOL))
    if op == "grant":
        scopes = [s for s in POOL[gid] if rng.random() < 0.6] or [POOL[gid][0]]
        return {"op": op, "g": gid, "scopes": scopes}
    return {"op": op, "g": gid}


def generate(seed: int, steps: int | None = None) -> tuple[dict[str, list[str]], list[Step]]:
    """The initial grants and the step list of schedule ``seed``."""
    rng = random.Random(seed)
    initial = {gid: [s for s in POOL[gid] if rng.random() < 0.7] or [POOL[gid][0]]
               for gid in sorted(POOL) if rng.random() < 0.75} or {"g-loc": list(POOL["g-loc"])}
    out: list[Step] = []
    running, down, full = True, set(), False
    for _ in range(steps if steps is not None else rng.randint(5, 10)):
        op = rng.choices(list(_WEIGHTS), list(_WEIGHTS.values()))[0]
        # Keep schedules plausible (shrinking may still make any list, and every step copes with any state).
        if (op == "start" and running) or (op in ("kill", "stop", "restart") and not running):
            op = "wait"
        if (op == "up" and not down) or (op == "down" and len(down) == 2):
            op = "grant"
        if op == "free" and not full:
            op = "fill"
        if op == "local" and running:
            op = "kill"
        step: Step
        if op in ("grant", "revoke", "rotate", "revoke_all"):
            step = _consent_step(rng) if op != "revoke_all" else {"op": op}
        elif op == "burst":
            step = {"op": op, "steps": [_consent_step(rng) for _ in range(rng.randint(2, 4))]}
        elif op == "replay":
            step = {"op": op, "back": rng.randint(1, 3)}
        elif op == "skew":
            step = {"op": op, "s": rng.randint(-SKEW_S, SKEW_S)}
        elif op == "down":
            step = {"op": op, "b": rng.choice(sorted({"A", "B"} - down))}
            down.add(step["b"])
        elif op == "up":
            step = {"op": op, "b": rng.choice(sorted(down))}
            down.discard(step["b"])
        elif op == "damage":
            step = {"op": op, "how": rng.choice(["truncate", "garble", "delete"])}
        elif op == "wait":
            step = {"op": op, "s": round(rng.uniform(0.3, 2.0), 2)}
        else:
            step = {"op": op}
        if op in ("kill", "stop"):
            running = False
        elif op in ("start", "damage", "restart"):
            running = True
        elif op == "fill":
            full = True
        elif op == "free":
            full = False
        out.append(step)
    return initial, out
