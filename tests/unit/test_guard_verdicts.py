"""DestinationGuard.check_address remembers verdicts per host string: the same answers, bounded."""

from __future__ import annotations

import ipaddress

import pytest

from proxy.errors import ForbiddenDestination
from proxy.upstream import guard as guard_module
from proxy.upstream.guard import DestinationGuard


@pytest.mark.parametrize("host", ["127.0.0.1", "10.1.2.3", "[::1]", "::ffff:127.0.0.1", "0.0.0.0"])
def test_forbidden_literals_stay_forbidden_when_asked_again(host: str) -> None:
    guard = DestinationGuard()
    for _ in range(3):
        with pytest.raises(ForbiddenDestination):
            guard.check_address(host)


def test_allowed_literals_and_names_pass_and_allow_networks_apply() -> None:
    guard = DestinationGuard([ipaddress.ip_network("127.0.0.0/8")])
    for _ in range(2):
        guard.check_address("127.0.0.1")
        guard.check_address("93.184.216.34")
        guard.check_address("cdn.example.com")  # names are checked at resolve time
    with pytest.raises(ForbiddenDestination):
        guard.check_address("192.168.1.1")


def test_verdicts_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guard_module, "_MAX_VERDICTS", 8)
    guard = DestinationGuard()
    for n in range(50):
        with pytest.raises(ForbiddenDestination):
            guard.check_address(f"10.0.0.{n}")
        guard.check_address(f"8.8.8.{n}")
    assert len(guard._verdicts) <= 8
