"""Bad input gets one clear error naming the file/field, and nothing in the state directory is lost."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from vgw.base.errors import ConfigError
from vgw.config.settings import load_config
from vgw.pipeline.catalogue import MAX_DBC_BYTES, MAX_DBC_MESSAGES, MAX_DBC_SIGNALS, MAX_DBC_WORDS, load_catalogue
from vgw.pipeline.router import Pipeline
from vgw_sim.broker import free_port
from vgw_sim.paths import default_dbc, default_signal_map

from tests.agentkit import Authority, vgw, write_config

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dbc" / "cantools"


@pytest.fixture
def cfg(tmp_path: Path, pki) -> Path:
    auth = Authority(tmp_path)
    return write_config(tmp_path, pki, free_port(), auth.trust, can={"channel": "x"})


def _rewrite(cfg: Path, old: str, new: str) -> Path:
    text = cfg.read_text()
    assert old in text
    cfg.write_text(text.replace(old, new, 1))
    return cfg


def test_unknown_key_is_an_error(cfg: Path) -> None:
    _rewrite(cfg, "[consent]", "[consent]\ntrust_key = []")
    with pytest.raises(ConfigError, match=r"\[consent\] unknown key 'trust_key'"):
        load_config(cfg)


def test_unknown_section_is_an_error(cfg: Path) -> None:
    cfg.write_text(cfg.read_text() + "\n[extra]\na = 1\n")
    with pytest.raises(ConfigError, match=r"unknown section \[extra\]"):
        load_config(cfg)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")


def test_bad_toml(tmp_path: Path) -> None:
    p = tmp_path / "bad.toml"
    p.write_text("[device\nid = 1\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(p)


def test_wrong_type_and_missing_file(cfg: Path) -> None:
    text = cfg.read_text()
    cfg.write_text(text.replace("backoff_min_s = 0.2", 'backoff_min_s = "fast"'))
    with pytest.raises(ConfigError, match=r"\[mqtt\] backoff_min_s: expected"):
        load_config(cfg)
    cfg.write_text(text.replace('ca_file = "', 'ca_file = "/nonexistent', 1))
    with pytest.raises(ConfigError, match=r"\[mqtt\] ca_file: file not found"):
        load_config(cfg)


def test_no_source_and_forbidden_interface(cfg: Path) -> None:
    text = cfg.read_text()
    head = text.split("[can]")[0]
    cfg.write_text(head + "[batch]\n")
    with pytest.raises(ConfigError, match="no source configured"):
        load_config(cfg)
    cfg.write_text(text.replace('interface = "virtual"', 'interface = "udp_multicast"'))
    with pytest.raises(ConfigError, match="udp_multicast"):
        load_config(cfg)


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path, cfg: Path) -> None:
    (tmp_path / "maps").mkdir()
    (tmp_path / "maps" / "signals.toml").write_text(default_signal_map().read_text())
    _rewrite(cfg, f'signal_map = "{default_signal_map()}"', 'signal_map = "maps/signals.toml"')
    assert load_config(cfg).can.signal_map == tmp_path / "maps" / "signals.toml"  # type: ignore[union-attr]


def test_cli_errors_are_one_line_without_traceback(cfg: Path) -> None:
    _rewrite(cfg, "[consent]", "[consent]\nbogus = 1")
    for args in (["run", "--config", str(cfg)], ["status", "--config", str(cfg)]):
        r = vgw(*args)
        assert r.returncode == 1
        assert r.stderr.strip().count("\n") == 0, r.stderr
        assert "bogus" in r.stderr and "Traceback" not in r.stderr


def test_dbc_rejected_names_file_and_offers_lax_parsing(tmp_path: Path) -> None:
    bad = tmp_path / "broken.dbc"
    # A 16-bit signal in a 1-byte message: cantools rejects it in strict mode.
    bad.write_text('VERSION ""\nBU_: ECU\nBO_ 100 Msg: 1 ECU\n SG_ Sig : 0|16@1+ (1,0) [0|1] "" ECU\n')
    with pytest.raises(ConfigError) as err:
        load_catalogue([bad], default_signal_map())
    assert str(bad) in str(err.value) and "DBC rejected" in str(err.value)
    assert "dbc_strict = false" in str(err.value)


@pytest.mark.skipif(not SHARED.exists(), reason="../shared/data not present (a user's clone has none)")
def test_real_world_broken_dbc_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"bad_message_length\.dbc: DBC rejected"):
        load_catalogue([SHARED / "bad_message_length.dbc"], default_signal_map())


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ('message = "Nope"\nsignal = "X"\npath = "Vehicle.Speed"\nscope = "read_speedometer"', "no message 'Nope'"),
        ('message = "VehicleDynamics"\nsignal = "Nope"\npath = "Vehicle.Speed"\nscope = "read_speedometer"',
         "has no signal 'Nope'"),
        ('message = "VehicleDynamics"\nsignal = "VehicleSpeed"\npath = "Vehicle.Speed"\nscope = "control_speed"',
         "unknown scope 'control_speed'"),
        ('message = "VehicleDynamics"\nsignal = "VehicleSpeed"\npath = "speed"\nscope = "read_speedometer"',
         "is not a VSS path"),
        ('message = "VehicleDynamics"\nsignal = "VehicleSpeed"\npath = "Vehicle.Speed"\nscope = "read_speedometer"'
         '\nunit = "km/h"', "unknown key 'unit'"),
    ],
)
def test_signal_map_errors(tmp_path: Path, entry: str, message: str) -> None:
    p = tmp_path / "signals.toml"
    p.write_text("[[signal]]\n" + entry + "\n")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_catalogue([default_dbc()], p)


def test_unknown_ids_and_short_frames_are_counted_not_fatal() -> None:
    from vgw.contract.consent.model import Grant, Recipient
    from vgw_sim.cloud import RecipientKey, consent_claims, grant

    del RecipientKey, consent_claims, grant
    cat = load_catalogue([default_dbc()], default_signal_map())
    pipe = Pipeline(cat)
    g = Grant(id="g", controller="c", purpose="p", scopes=("read_speedometer", "read_tires"),
              recipient=Recipient("X25519", b"\x01" * 32))
    pipe.swap((g,))
    pipe.process(0x7FF, b"\x00" * 8, 1.0)  # no such message
    pipe.process(0x1FFFFFFF, b"", 1.0)
    speed_id = next(fid for fid, m in cat.messages.items() if m.name == "VehicleDynamics")
    pipe.process(speed_id, b"\x10", 1.0)  # one byte: VehicleSpeed (16 bits) does not fit
    tyre_id = next(fid for fid, m in cat.messages.items() if m.name == "TirePressure")
    pipe.process(tyre_id, b"\x10\x09\x20\x09", 2.0)  # half a frame: the first two tyres fit
    pipe.process(speed_id, b"\x10\x27", 3.0)
    assert pipe.counters["frames_unrouted"] == 2
    assert pipe.counters["signals_short"] == 3
    samples = pipe.batches["g"].samples
    assert [s["path"] for s in samples] == [
        "Vehicle.Chassis.Axle.Row1.Wheel.Left.Tire.Pressure",
        "Vehicle.Chassis.Axle.Row1.Wheel.Right.Tire.Pressure",
        "Vehicle.Speed",
    ]
    assert samples[-1]["value"] == pytest.approx(100.0)


@pytest.mark.parametrize("nesting", ["x = " + "[" * 5000 + "]" * 5000, "x = " + "{a = " * 3000 + "1" + "}" * 3000])
def test_a_signal_map_nested_too_deeply_is_one_line(tmp_path: Path, cfg: Path, nesting: str) -> None:
    """Before: RecursionError, thousands of lines of traceback (the config file's loader already said "nested
    too deeply"); now both files go through one TOML loader."""
    deep = tmp_path / "deep.toml"
    deep.write_text(nesting + "\n")
    with pytest.raises(ConfigError, match=r"deep\.toml: invalid TOML: arrays or tables nested too deeply"):
        load_catalogue([default_dbc()], deep)
    _rewrite(cfg, f'signal_map = "{default_signal_map()}"', f'signal_map = "{deep}"')
    r = vgw("run", "--config", str(cfg))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().count("\n") == 0 and "nested too deeply" in r.stderr, r.stderr[-2000:]


# -- a DBC's budget (docs/guarantees.md "Budgets (inputs)"): counted before cantools parses it -------------------

def _big_dbc(path: Path, messages: int, signals_per: int, *, values: int = 0, first: int = 0) -> Path:
    """A DBC of ``messages`` extended-id messages (ids and names from ``first`` on) of ``signals_per`` signals;
    ``values`` value descriptions (VAL_) on the first signal of each message."""
    lines = ['VERSION ""', "NS_ :", "BS_:", "BU_: ECU"]
    for m in range(first, first + messages):
        lines.append(f"BO_ {(m + 1) | 0x80000000} M{m}: 8 ECU")
        lines += [f' SG_ S{m}_{k} : {k % 64}|1@1+ (1,0) [0|1] "" ECU' for k in range(signals_per)]
    if values:
        lines += [f"VAL_ {(m + 1) | 0x80000000} S{m}_0 " + " ".join(f'{i} "v{i}"' for i in range(values)) + " ;"
                  for m in range(first, first + messages)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _peak_mb(fn: Any) -> float:
    import tracemalloc

    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak / 1e6


@pytest.mark.parametrize(("shape", "needle"), [
    ((MAX_DBC_MESSAGES + 1, 1, 0), f"{MAX_DBC_MESSAGES + 1} messages, more than the {MAX_DBC_MESSAGES} allowed"),
    ((MAX_DBC_SIGNALS // 64 + 1, 64, 0), f"signals, more than the {MAX_DBC_SIGNALS} allowed"),
    ((400, 1, 1000), f"strings), more than the {MAX_DBC_WORDS} allowed"),
])
def test_a_dbc_beyond_its_budget_is_refused_before_cantools_parses_it(tmp_path: Path, shape: tuple[int, int, int],
                                                                      needle: str) -> None:
    """Before: 100k signals took 19.9 s and 381 MB, and value tables cost more than 40 bytes of memory per byte
    of DBC; every size under 64 MiB was parsed. Now the messages, signals and words are counted first: the
    refusal names the file, the count and the cap, and costs a few MB, not what cantools would build."""
    messages, per, values = shape
    big = _big_dbc(tmp_path / "big.dbc", messages, per, values=values)
    err: list[ConfigError] = []

    def load() -> None:
        try:
            load_catalogue([big], default_signal_map())
        except ConfigError as exc:
            err.append(exc)

    peak = _peak_mb(load)
    assert err and str(big) in str(err[0]) and needle in str(err[0]), err
    assert peak < 3 * big.stat().st_size / 1e6 + 5, f"{peak:.0f} MB to refuse a {big.stat().st_size} B DBC"


def test_the_dbc_budget_counts_every_file_together(tmp_path: Path) -> None:
    per_file = MAX_DBC_SIGNALS // 2 // 64 + 1
    a = _big_dbc(tmp_path / "a.dbc", per_file, 64)
    b = _big_dbc(tmp_path / "b.dbc", per_file, 64, first=per_file)
    with pytest.raises(ConfigError, match=r"b\.dbc: .*signals.*more than the"):
        load_catalogue([a, b], default_signal_map())


def test_a_dbc_over_the_byte_cap_is_refused_before_it_is_read(tmp_path: Path) -> None:
    big = tmp_path / "huge.dbc"
    with big.open("wb") as fh:
        fh.truncate(MAX_DBC_BYTES + 1)  # sparse
    with pytest.raises(ConfigError, match=rf"huge\.dbc: DBC file is {MAX_DBC_BYTES + 1} bytes, more than the"):
        load_catalogue([big], default_signal_map())


@pytest.mark.skipif(not SHARED.exists(), reason="../shared/data not present (a user's clone has none)")
def test_every_real_dbc_is_within_the_budget() -> None:
    """The cantools corpus (the largest: vehicle.dbc, 217 messages) loads as before: the budget refuses no real
    DBC (docs/performance.md records its load time and memory)."""
    from vgw.pipeline.catalogue import dbc_counts

    for path in sorted(SHARED.glob("*.dbc")):
        counts = dbc_counts(path.read_bytes())
        assert counts.messages <= MAX_DBC_MESSAGES and counts.signals <= MAX_DBC_SIGNALS, path
        assert counts.words <= MAX_DBC_WORDS, path
