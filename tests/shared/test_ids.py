"""The one tenant-id rule (shared.ids), the one docs/CONTRACT.md states."""

from __future__ import annotations

import pathlib

import pytest

from services.identity.credentials import _KEY_RE, new_id
from shared.errors import InvalidArgument
from shared.ids import check_tenant_id, is_tenant_id
from shared.tenancy import PLATFORM_TENANT


@pytest.mark.parametrize("value", ["t_a", PLATFORM_TENANT, "t_3kq7v2m5x4cz6hba", "t_" + "a" * 60, "t_0"])
def test_well_formed_ids_pass(value: str):
    assert is_tenant_id(value) and check_tenant_id(value) == value


@pytest.mark.parametrize(
    "value",
    [
        "",
        "t_",
        "t",
        "a_b",
        "t_a_b",
        "t_A",
        "T_a",
        "t_a-b",
        "t_a b",
        " t_a",
        "t_a\n",
        "t_" + "a" * 61,
        "t_é",
        "t_a,t_b",
        "*",
    ],
)
def test_malformed_ids_are_invalid_argument_naming_the_field(value: str):
    assert not is_tenant_id(value)
    with pytest.raises(InvalidArgument) as info:
        check_tenant_id(value, "target_tenant_id")
    assert info.value.reason == "INVALID_TENANT_ID" and list(info.value.violations) == ["target_tenant_id"]


def test_ids_identity_mints_pass_and_api_keys_split_one_way():
    for _ in range(200):
        tenant = new_id("t")
        assert is_tenant_id(tenant) and len(tenant) == 18
        key = f"bk_{tenant}_{new_id('k')}_{'ab' * 24}"
        assert _KEY_RE.match(key).group(1) == tenant


def test_contract_states_the_rule():
    contract = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "CONTRACT.md").read_text()
    assert "`t_` then 1-60 lower-case letters or digits" in contract and "shared/ids.py" in contract
