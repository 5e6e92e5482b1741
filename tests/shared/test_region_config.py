"""Region map configuration (data residency): parsed once at start, refused loudly when incomplete."""

from __future__ import annotations

import pytest

from shared.config import (
    DEFAULT_REGION,
    RegionDatabase,
    ServiceConfig,
    default_region,
    regions,
)


def test_unset_is_one_region_with_todays_urls(tmp_path):
    env = {"BULKHEAD_DATA_DIR": str(tmp_path), "BULKHEAD_STATE_DATABASE_URL": "postgresql://a@h/state"}
    config = ServiceConfig.from_env("state", env)
    assert (config.default_region, config.regions) == (DEFAULT_REGION, ("local",))
    assert config.region_databases() == {"local": RegionDatabase("postgresql://a@h/state", "postgresql://a@h/state")}


def test_default_region_comes_first_and_names_the_main_urls():
    env = {
        "BULKHEAD_REGIONS": "eu, us ,eu",
        "BULKHEAD_DEFAULT_REGION": "us",
        "BULKHEAD_DATABASE_URL": "postgresql://app@us/db",
        "BULKHEAD_DATABASE_OWNER_URL": "postgresql://own@us/db",
        "BULKHEAD_DATABASE_URL_EU": "postgresql://app@eu/db",
        "BULKHEAD_METERING_DATABASE_URL_EU": "postgresql://app@eu/metering",
        "BULKHEAD_METERING_DATABASE_OWNER_URL_EU": "postgresql://own@eu/metering",
    }
    assert regions(env) == ("us", "eu") and default_region(env) == "us"
    state = ServiceConfig.from_env("state", env).region_databases()
    assert state == {
        "us": RegionDatabase("postgresql://app@us/db", "postgresql://own@us/db"),
        "eu": RegionDatabase("postgresql://app@eu/db", "postgresql://app@eu/db"),
    }
    metering = ServiceConfig.from_env("metering", env).region_databases()  # its own URL wins over the shared one
    assert metering["eu"] == RegionDatabase("postgresql://app@eu/metering", "postgresql://own@eu/metering")


def test_first_listed_region_is_the_default_when_none_is_named():
    assert default_region({"BULKHEAD_REGIONS": "eu-west,us-east"}) == "eu-west"


def test_embedded_defaults_get_a_file_per_region(tmp_path):
    env = {"BULKHEAD_DATA_DIR": str(tmp_path), "BULKHEAD_REGIONS": "us,eu-west"}
    dbs = ServiceConfig.from_env("credentials", env).region_databases()
    assert dbs["us"].url == f"sqlite+aiosqlite:///{tmp_path}/credentials.db"
    assert dbs["eu-west"].url == f"sqlite+aiosqlite:///{tmp_path}/regions/eu-west/credentials.db"


def test_a_region_without_a_database_is_refused_at_start_naming_the_variables():
    env = {"BULKHEAD_REGIONS": "us,eu", "BULKHEAD_STATE_DATABASE_URL": "postgresql://app@us/state"}
    config = ServiceConfig.from_env("state", env)
    with pytest.raises(ValueError, match="BULKHEAD_STATE_DATABASE_URL_EU or BULKHEAD_DATABASE_URL_EU"):
        config.region_databases()


@pytest.mark.parametrize("bad", ["EU", "eu west", "1eu", "-eu", "e" * 32, "eu_west", "eu;drop"])
def test_malformed_region_names_are_refused(bad):
    with pytest.raises(ValueError, match="must be 1-31"):
        regions({"BULKHEAD_REGIONS": f"us,{bad}"})
    with pytest.raises(ValueError, match="must be 1-31"):
        default_region({"BULKHEAD_DEFAULT_REGION": bad})


def test_default_region_outside_the_list_is_refused():
    with pytest.raises(ValueError, match="not one of BULKHEAD_REGIONS"):
        regions({"BULKHEAD_REGIONS": "us,eu", "BULKHEAD_DEFAULT_REGION": "ap"})
