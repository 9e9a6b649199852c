"""Bad input gets one clear error naming the file/field, and nothing in the state directory is lost."""

from __future__ import annotations

from pathlib import Path

import pytest
from vgw.catalogue import load_catalogue
from vgw.config import load_config
from vgw.errors import ConfigError
from vgw.pipeline.router import Pipeline
from vgw.simulators.broker import free_port
from vgw.simulators.paths import default_dbc, default_signal_map

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
    from vgw.consent.model import Grant, Recipient
    from vgw.simulators.cloud import RecipientKey, consent_claims, grant

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
