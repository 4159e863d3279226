"""The discovery rules without a network: when to advertise, what TXT says, which peers the router takes."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from laas.client.mdns import MODELS_MAX_BYTES, DaemonRecord, encode_txt
from laas.daemon import tokens
from laas.daemon.discovery import advertised_addresses, lan_reachable, node_id, should_advertise, token_id
from laas.daemon.lan_peers import allowed
from laas.daemon.settings import Settings, SettingsError, load_settings


def _settings(listen: str, **values: object) -> Settings:
    return Settings(listen=listen, home=Path("/nonexistent"), **values)  # type: ignore[arg-type]


@pytest.mark.parametrize(("listen", "reachable"), [
    ("127.0.0.1:7734", False), ("[::1]:7734", False), ("localhost:7734", False), ("unix:/run/laas/s", False),
    ("127.0.0.1:7734,unix:/run/laas/s", False), ("0.0.0.0:7734", True), ("[::]:7734", True),
    ("192.168.1.20:7734", True), ("127.0.0.1:1,10.0.0.2:2", True), ("kitchen.lan:7734", True),
])
def test_lan_reachable_is_any_tcp_address_beyond_loopback(listen: str, reachable: bool) -> None:
    assert lan_reachable(_settings(listen)) is reachable


def test_auto_advertises_only_beyond_loopback_and_never_an_open_daemon_unless_allowed(
        caplog: pytest.LogCaptureFixture) -> None:
    assert not should_advertise(_settings("127.0.0.1:7734"))
    with caplog.at_level(logging.WARNING):
        assert not should_advertise(_settings("0.0.0.0:7734"))
    assert "discovery_allow_unauthenticated" in caplog.text
    assert should_advertise(_settings("0.0.0.0:7734", discovery_allow_unauthenticated=True))
    assert not should_advertise(_settings("0.0.0.0:7734", discovery="off", discovery_allow_unauthenticated=True))


def test_on_advertises_on_loopback_and_refuses_to_expose_an_open_daemon() -> None:
    assert should_advertise(_settings("127.0.0.1:7734", discovery="on"))
    with pytest.raises(SettingsError) as e:
        should_advertise(_settings("0.0.0.0:7734", discovery="on"))
    assert e.value.field == "discovery_allow_unauthenticated"


def test_advertised_addresses_follow_listen_interfaces_and_ip_version() -> None:
    assert advertised_addresses(_settings("127.0.0.1:1,unix:/x")) == ["127.0.0.1"]
    wildcard = _settings("0.0.0.0:1", discovery_interfaces=("192.168.1.20", "fd00::2"), discovery_ip_version="all")
    assert advertised_addresses(wildcard) == ["192.168.1.20", "fd00::2"]
    assert advertised_addresses(_settings("0.0.0.0:1", discovery_interfaces=("192.168.1.20", "fd00::2"))) == [
        "192.168.1.20"]
    assert "127.0.0.1" not in advertised_addresses(_settings("0.0.0.0:1"))  # all non-loopback addresses


def test_the_txt_record_is_bounded() -> None:
    models = [f"model-number-{i:03d}-with-a-long-name" for i in range(100)]
    txt = encode_txt("n" * 64, models, tls=False, auth=True, load=3, free=5, wait_ms=123456.0)
    assert len(txt["models"].encode()) <= MODELS_MAX_BYTES and txt["nmodels"] == "100"
    assert all(len(f"{k}={v}".encode()) < 255 for k, v in txt.items())
    assert sum(len(f"{k}={v}".encode()) + 1 for k, v in txt.items()) < 400
    assert (txt["id"], txt["auth"], txt["load"], txt["free"], txt["wait"]) == ("n" * 32, "1", "3", "5", "120000")


def test_peers_are_taken_by_name_or_glob_and_same_token_needs_a_token() -> None:
    record = DaemonRecord("kitchen-1", ("192.168.1.20",), 7734, token_id="abc")
    assert allowed(_settings("127.0.0.1:1", discovery_peers=("kitchen-*",)), record)
    assert not allowed(_settings("127.0.0.1:1", discovery_peers=("office",)), record)
    assert not allowed(_settings("127.0.0.1:1"), record)
    assert not allowed(_settings("127.0.0.1:1", discovery_peers=("same-token",)), record)  # no token here yet


def test_the_node_id_is_stable(tmp_path: Path) -> None:
    first = node_id(tmp_path)
    assert len(first) == 32 and node_id(tmp_path) == first


def test_discovery_settings_are_checked(tmp_path: Path) -> None:
    env = {"LAAS_HOME": str(tmp_path), "LAAS_DISCOVERY_PEERS": "kitchen-*, office",
           "LAAS_DISCOVERY_INTERFACES": "127.0.0.1"}
    s = load_settings(environ=env)
    assert s.discovery_peers == ("kitchen-*", "office") and s.discovery_interfaces == ("127.0.0.1",)
    for name, bad in (("LAAS_DISCOVERY", "maybe"), ("LAAS_DISCOVERY_IP_VERSION", "v5"),
                      ("LAAS_DISCOVERY_LOAD_INTERVAL_S", "0"), ("LAAS_DISCOVERY_NAME", "x" * 64),
                      ("LAAS_DISCOVERY_TTL_S", "0")):
        with pytest.raises(SettingsError) as e:
            load_settings(environ={"LAAS_HOME": str(tmp_path), name: bad})
        assert e.value.field == name.removeprefix("LAAS_").lower(), name


def test_the_token_id_is_a_digest_of_the_token_file_and_same_token_matches_it(tmp_path: Path) -> None:
    home_a, home_b, home_c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    a = Settings(home=home_a, discovery_peers=("same-token",))
    assert token_id(a) == ""  # no token file: no id, and same-token matches nothing
    assert not allowed(a, DaemonRecord("b", ("192.168.1.21",), 7734, token_id=""))
    token, _ = tokens.create(home_a / "tokens", "fleet", frozenset({"generate"}))
    mine = token_id(a)
    assert len(mine) == 16 and token not in mine
    home_b.mkdir()
    shutil.copy(home_a / "tokens", home_b / "tokens")  # a daemon given the same tokens
    assert token_id(Settings(home=home_b)) == mine
    tokens.create(home_c / "tokens", "fleet", frozenset({"generate"}))  # another token of the same name
    assert token_id(Settings(home=home_c)) not in ("", mine)
    assert allowed(a, DaemonRecord("b", ("192.168.1.21",), 7734, token_id=mine))
    assert not allowed(a, DaemonRecord("c", ("192.168.1.22",), 7734, token_id=token_id(Settings(home=home_c))))
    txt = encode_txt("n", ["m"], tls=False, auth=True, token_id=mine)
    assert txt["tid"] == mine
    tokens.revoke(home_a / "tokens", "fleet")  # the id follows the file
    assert token_id(a) == ""
