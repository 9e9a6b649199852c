"""A private NATS server with JetStream and its MQTT listener (mutual TLS) on free loopback ports.

The NATS server is built to cluster (routes, JetStream replication); its MQTT support speaks MQTT 3.1.1
only (QoS 0/1, retained messages, persistent sessions, all stored in JetStream streams). :class:`NatsMqtt`
mirrors :class:`vgw_sim.broker.Mosquitto`: it writes a config file into its own work directory, starts
``nats-server -c``, waits until the MQTT listener is up, stops it (SIGTERM, then SIGKILL; idempotent) and
restarts it on the same ports with the same JetStream store (retained messages and sessions survive).

Identity and policy (README "Topics"): ``tls { verify_and_map: true }`` maps a client certificate to the user
named by its DNS SAN (our device certificates carry the device id there, see :mod:`vgw_sim.pki`), and
:func:`nats_config` gives every device user permission to publish only ``vgw.<id>.data.>``, ``.receipt``
and ``.status`` and to subscribe only ``vgw.<id>.consent``; the cloud user gets everything under ``vgw``.
MQTT topic ``vgw/dev-0001/data/g`` is NATS subject ``vgw.dev-0001.data.g``, so a device id must not contain
``.``, ``*``, ``>`` or white space. Every MQTT user also needs ``subscribe $MQTT.sub.>``: the server
delivers QoS 1 messages through a JetStream consumer whose delivery subject is checked against the user's
subscribe permissions. (An MQTT client cannot itself subscribe ``$MQTT/...``; the server refuses it.)

:mod:`vgw_sim.nats_cluster` runs three of these as one cluster; :func:`telemetry_stream_config` and
:func:`telemetry_consumer_config` define the JetStream stream and durable consumer the cloud's workers share
(``deploy/nats/stream-vgw.json``, ``consumer-vgw-workers.json``), and :func:`cloud_permissions` lets the
cloud user use that stream's JetStream API and no other.

Errors (``RuntimeError`` subclasses: a missing or failing test broker is an environment problem)::

    BrokerError                       (vgw_sim.broker)
     +-- NatsNotFound                 no nats-server binary
     +-- BrokerStartError             nats-server exited or did not listen in time (log tail in the message)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vgw.cloud.jetstream import STREAM, stored_prefix

from vgw_sim.broker import HOST, BrokerError, BrokerStartError, free_port
from vgw_sim.server import ServerProcess

if TYPE_CHECKING:
    from vgw_sim.pki import TestPKI

__all__ = ["NatsMqtt", "NatsNotFound", "authorization_block", "device_permissions", "find_nats_server", "nats_config"]

_START_TIMEOUT = 15.0
_STOP_TIMEOUT = 10.0
_START_ATTEMPTS = 5
_READY = "Server is ready"
_BAD_ID = re.compile(r"[.*>\s]")



class NatsNotFound(BrokerError):
    """No nats-server binary on this machine."""


def find_nats_server() -> str:
    """Path of ``nats-server`` (``$PATH``, then ``/usr/sbin``, ``/usr/local/bin``). Raises :class:`NatsNotFound`."""
    found = shutil.which("nats-server")
    if found:
        return found
    for candidate in ("/usr/sbin/nats-server", "/usr/local/bin/nats-server", "/usr/bin/nats-server"):
        if os.access(candidate, os.X_OK):
            return candidate
    raise NatsNotFound("nats-server not found: install it (Debian/Ubuntu: `apt-get install -y nats-server`)")


def _check_id(name: str) -> None:
    if not name or _BAD_ID.search(name) or '"' in name or "/" in name:
        raise ValueError(f"invalid NATS user/device id {name!r}: no '.', '*', '>', '/', quotes or spaces")


def device_permissions(device: str, prefix: str = "vgw") -> str:
    """The NATS ``permissions`` block of one device user (README "Topics"), as config text.

    Raises ``ValueError`` for an id or prefix that cannot be a NATS subject token.
    """
    _check_id(device)
    _check_id(prefix)
    base = f"{prefix}.{device}"
    return (
        f'{{publish: {{allow: ["{base}.data.>", "{base}.receipt", "{base}.status", "{base}.cert.request"]}}, '
        f'subscribe: {{allow: ["{base}.consent", "{base}.cert.response", "$MQTT.sub.>"]}}}}'
    )


def claim_permissions(prefix: str = "vgw") -> str:
    """The ``permissions`` block of a claim identity (README "Enrollment"): ask to enroll, read the answers."""
    _check_id(prefix)
    return (f'{{publish: {{allow: ["{prefix}.enroll.*.request"]}}, '
            f'subscribe: {{allow: ["{prefix}.enroll.*.response", "$MQTT.sub.>"]}}}}')


def cloud_permissions(prefix: str = "vgw", stream: str = STREAM) -> str:
    """The cloud user's ``permissions`` block: everything under ``prefix`` (consent out, telemetry in) and
    ``<prefix>-stored`` (what relays store in the telemetry stream), and
    the JetStream API of the telemetry stream only (create/inspect it and its consumers, pull, acknowledge);
    ``_INBOX.>`` for the API's replies. Other streams (the MQTT sessions' ``$MQTT_*``) stay out of reach."""
    _check_id(prefix)
    _check_id(stream)
    api = "$JS.API"
    stored = stored_prefix(prefix)
    pub = [f"{prefix}.>", f"{stored}.>", f"{api}.INFO", f"{api}.STREAM.*.{stream}", f"{api}.CONSUMER.*.{stream}",
           f"{api}.CONSUMER.*.{stream}.>", f"{api}.CONSUMER.*.*.{stream}.>", f"$JS.ACK.{stream}.>"]
    sub = [f"{prefix}.>", "$MQTT.sub.>", "_INBOX.>"]
    return (f"{{publish: {{allow: [{', '.join(json.dumps(x) for x in pub)}]}}, "
            f"subscribe: {{allow: [{', '.join(json.dumps(x) for x in sub)}]}}}}")


def authorization_block(devices: Iterable[str], *, prefix: str = "vgw",
                        cloud_users: Iterable[str] = ("cloud",), claim_users: Iterable[str] = ("vgw-claim",)) -> str:
    """The ``authorization { users = [...] }`` block: one user per device certificate, the claim identities
    (enrollment topics only) and the cloud.

    Raises ``ValueError`` for an id or prefix that cannot be a NATS subject token.
    """
    _check_id(prefix)
    users = []
    for cloud in cloud_users:
        _check_id(cloud)
        users.append(f'    {{user: "{cloud}", permissions: {cloud_permissions(prefix)}}}')
    claim_users = list(claim_users)
    for device in devices:
        if device not in claim_users:  # a claim identity is no device, whatever certificate it was issued as
            users.append(f'    {{user: "{device}", permissions: {device_permissions(device, prefix)}}}')
    for claim in claim_users:
        _check_id(claim)
        users.append(f'    {{user: "{claim}", permissions: {claim_permissions(prefix)}}}')
    return "\n".join(["authorization {", "  users = [", *users, "  ]", "}"]) + "\n"


def nats_config(
    *,
    devices: Iterable[str],
    ca_file: str | os.PathLike[str],
    cert_file: str | os.PathLike[str],
    key_file: str | os.PathLike[str],
    store_dir: str | os.PathLike[str],
    mqtt_listen: str,
    client_listen: str,
    prefix: str = "vgw",
    cloud_users: Iterable[str] = ("cloud",),
    server_name: str = "vgw-nats",
    ack_wait: str = "5s",
    cluster: str = "",
    stream_replicas: int = 1,
    http_listen: str = "",
    extra: str = "",
) -> str:
    """A nats-server config (text) for vgw: JetStream, MQTT over mutual TLS, one user per device certificate.

    ``ack_wait`` is how long the server waits for an MQTT PUBACK before it redelivers a QoS 1 message.
    ``cluster`` is a ``cluster { ... }`` block (see :func:`cluster_block`); ``stream_replicas`` the replica
    count of the MQTT session, retained and QoS 1 streams (3 on a 3-node cluster, so they survive a node).
    ``http_listen`` (``host:port``) opens the monitoring listener, whose ``/healthz`` says whether the node's
    JetStream is current (see :meth:`NatsMqtt.healthz`).
    Raises ``ValueError`` for an invalid device id or prefix.
    """
    _check_id(prefix)
    tls = (
        f'tls {{ cert_file: "{cert_file}", key_file: "{key_file}", ca_file: "{ca_file}", '
        "verify_and_map: true, timeout: 5 }"
    )
    return "\n".join(
        [
            "# written by vgw_sim.nats: a private NATS server for vgw (MQTT 3.1.1 over mutual TLS)",
            f"server_name: {server_name}",
            f"listen: {client_listen}",
            "# the NATS client port maps certificates to users too: users have no passwords",
            tls,
            f'jetstream {{ store_dir: "{store_dir}", max_memory_store: 268435456, max_file_store: 4294967296 }}',
            "max_payload: 1048576",
            f"http: {http_listen}" if http_listen else "",
            cluster,
            authorization_block(devices, prefix=prefix, cloud_users=cloud_users).rstrip("\n"),
            "mqtt {",
            f"  listen: {mqtt_listen}",
            f"  {tls}",
            f'  ack_wait: "{ack_wait}"',
            f"  stream_replicas: {stream_replicas}",
            "}",
            extra,
        ]
    ) + "\n"


class NatsMqtt(ServerProcess):
    """A private ``nats-server`` with JetStream and an MQTT listener over mutual TLS.

    ``devices`` are the device ids (= certificate DNS SAN) that get a user and the per-device permissions;
    :meth:`add_devices` adds more (config reload, no restart). ``port`` is the MQTT port (fixed, or a free
    one picked at the first start and kept for restarts). The JetStream store lives in the work directory,
    so retained messages and sessions survive :meth:`restart`. Raises :class:`NatsNotFound` at
    construction if nats-server is missing. ``http_port`` (fixed) opens the monitoring listener for
    :meth:`healthz`.
    """

    kind = "nats-server"
    stop_timeout = _STOP_TIMEOUT

    def __init__(
        self,
        *,
        ca_file: str | os.PathLike[str],
        cert_file: str | os.PathLike[str],
        key_file: str | os.PathLike[str],
        devices: Iterable[str] = (),
        prefix: str = "vgw",
        cloud_users: Iterable[str] = ("cloud",),
        port: int | None = None,
        ack_wait: str = "5s",
        workdir: str | os.PathLike[str] | None = None,
        binary: str | None = None,
        server_name: str = "vgw-nats",
        client_port: int | None = None,
        cluster: str = "",
        stream_replicas: int = 1,
        http_port: int | None = None,
    ) -> None:
        self._binary = binary or find_nats_server()
        self.host = HOST
        self._ca_file, self._cert_file, self._key_file = self._tls_files(ca_file, cert_file, key_file)
        self.prefix = prefix
        self._devices: list[str] = []
        for d in devices:
            _check_id(d)
            self._devices.append(d)
        self._cloud_users = list(cloud_users)
        self._ack_wait = ack_wait
        self._port: int | None = port
        self._client_port: int | None = client_port
        self.server_name = server_name
        self._cluster = cluster
        self._stream_replicas = stream_replicas
        self.http_port = http_port
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="vgw-nats-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.store_dir = self.workdir / "store"
        self.log_path = self.workdir / "nats.log"
        self.conf_path = self.workdir / "nats.conf"
        self._init_process(own_workdir=self._own_workdir)

    @classmethod
    def from_pki(cls, pki: TestPKI, *, devices: Iterable[str] | None = None, **kwargs: object) -> NatsMqtt:
        """A server trusting ``pki``'s CA with its server certificate; users for ``devices`` (default: all
        of ``pki``'s devices) and ``cloud``. Other keyword arguments go to the constructor."""
        return cls(
            ca_file=pki.ca.cert,
            cert_file=pki.server.cert,
            key_file=pki.server.key,
            devices=list(pki.devices) if devices is None else devices,
            **kwargs,  # type: ignore[arg-type]
        )

    # ------------------------------------------------------------ properties

    @property
    def devices(self) -> list[str]:
        return list(self._devices)

    @property
    def client_port(self) -> int:
        """The NATS client port (mutual TLS too). Raises ``RuntimeError`` before the first :meth:`start`."""
        if self._client_port is None:
            raise RuntimeError("nats-server client port is not known before start()")
        return self._client_port

    @property
    def nats_url(self) -> str:
        """``tls://127.0.0.1:<client port>`` for NATS clients (the cloud's JetStream workers)."""
        return f"tls://{self.host}:{self.client_port}"

    # ------------------------------------------------------------ lifecycle

    def _write_config(self, port: int, client_port: int) -> None:
        text = nats_config(
            devices=self._devices,
            ca_file=self._ca_file,
            cert_file=self._cert_file,
            key_file=self._key_file,
            store_dir=self.store_dir,
            mqtt_listen=f"{self.host}:{port}",
            client_listen=f"{self.host}:{client_port}",
            prefix=self.prefix,
            cloud_users=self._cloud_users,
            ack_wait=self._ack_wait,
            server_name=self.server_name,
            cluster=self._cluster,
            stream_replicas=self._stream_replicas,
            http_listen=f"{self.host}:{self.http_port}" if self.http_port is not None else "",
        )
        tmp = self.conf_path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.conf_path)

    def _monitor(self, query: str, timeout: float) -> tuple[dict[str, Any] | None, str]:
        """GET ``/<query>`` of the monitoring listener: (answer, "") or (None, why not)."""
        if self.http_port is None:
            raise RuntimeError(f"{self.server_name}: no monitoring listener (http_port)")
        if not self.running:
            return None, "not running"
        try:
            with urllib.request.urlopen(f"http://{self.host}:{self.http_port}/{query}", timeout=timeout) as resp:
                body = resp.read()
        except urllib.error.HTTPError as exc:  # healthz: 503 while not current, the reason in the body
            body = exc.read()
        except OSError as exc:
            return None, f"monitoring listener: {exc}"
        try:
            answer = json.loads(body)
        except ValueError:
            return None, f"/{query} answered {body[:200]!r}"
        return (answer, "") if isinstance(answer, dict) else (None, f"/{query} answered {body[:200]!r}")

    def healthz(self, timeout: float = 2.0) -> str | None:
        """None if the running server is healthy as a JetStream server (``/healthz?js-server-only=true``:
        accepting connections, in contact and current with the metadata leader), else why not. The streams
        are :meth:`streams`' business. Raises ``RuntimeError`` without ``http_port``."""
        answer, why = self._monitor("healthz?js-server-only=true", timeout)
        if answer is None:
            return why
        return None if answer.get("status") == "ok" else str(answer.get("error") or answer)

    def streams(self, timeout: float = 2.0) -> list[dict[str, Any]] | str:
        """The JetStream streams this server holds (``/jsz``), each ``{"account", "name", "cluster"}`` where
        ``cluster`` has ``leader`` and ``replicas`` (``name``, ``current``, ``offline``; exact only on the
        leader), or why they cannot be read. Raises ``RuntimeError`` without ``http_port``."""
        answer, why = self._monitor("jsz?accounts=true&streams=true&config=false", timeout)
        if answer is None:
            return why
        return [{"account": acc.get("name"), "name": st.get("name"), "cluster": st.get("cluster") or {}}
                for acc in answer.get("account_details") or [] for st in acc.get("stream_detail") or []]

    def add_devices(self, devices: Iterable[str]) -> None:
        """Give more device ids a user; a running server reloads its config (SIGHUP). Raises ``ValueError``."""
        new = [d for d in devices if d not in self._devices]
        for d in new:
            _check_id(d)
        self._devices.extend(new)
        if self.running and self._port is not None and self._client_port is not None and self._proc:
            self._write_config(self._port, self._client_port)
            offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            self._proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and "Reloaded" not in self._log_since(offset):
                time.sleep(0.02)

    def start(self, timeout: float = _START_TIMEOUT) -> NatsMqtt:
        """Start the server and wait until it is ready; returns ``self``. Raises :class:`BrokerStartError`."""
        if self._closed:
            raise RuntimeError("broker is closed")
        if self.running:
            raise RuntimeError("broker is already running")
        last_error = ""
        for _attempt in range(_START_ATTEMPTS):
            port = self._port if self._port is not None else free_port(self.host)
            client_port = self._client_port if self._client_port is not None else free_port(self.host)
            ok, last_error = self._try_start(port, client_port, timeout)
            if ok:
                self._port, self._client_port = port, client_port
                return self
            if "address already in use" in last_error.lower():
                if self._port is not None:
                    time.sleep(0.5)
                else:
                    self._client_port = None
                continue
            break
        raise BrokerStartError(f"nats-server did not start: {last_error.strip()[-2000:]}")

    def _try_start(self, port: int, client_port: int, timeout: float) -> tuple[bool, str]:
        self._write_config(port, client_port)
        return self._launch([self._binary, "-c", str(self.conf_path)],
                            lambda text: _READY in text and "Listening for MQTT clients" in text, timeout)


def main(argv: list[str] | None = None) -> int:
    """``python -m vgw_sim.nats users [--prefix P] [--cloud NAME] DEVICE-ID ... | -`` prints the
    authorization block for deploy/nats (``-``: ids one per line on stdin)."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m vgw_sim.nats")
    p.add_argument("what", choices=["users"])
    p.add_argument("--prefix", default="vgw")
    p.add_argument("--cloud", action="append", default=None, help="cloud user(s) (default: cloud)")
    p.add_argument("devices", nargs="+")
    args = p.parse_args(argv)
    ids = [line.strip() for line in sys.stdin if line.strip()] if args.devices == ["-"] else args.devices
    try:
        sys.stdout.write(authorization_block(ids, prefix=args.prefix, cloud_users=args.cloud or ["cloud"]))
    except ValueError as exc:
        print(f"python -m vgw_sim.nats: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
