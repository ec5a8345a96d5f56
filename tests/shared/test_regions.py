"""The rule that puts a source in its regional collections, as a table."""

from __future__ import annotations

import iso3166
import pytest

from shared.regions import CONTINENTS, REGIONS, US_STATES, check_region, country_of, regions_of

TABLE = [
    # (source path, regions)
    ("sources/us/ks/lane_county.json", ("global", "north_america", "us_midwest")),
    ("sources/us/ca/san_francisco.json", ("global", "north_america", "us_west")),
    ("sources/us/ny/city_of_new_york.json", ("global", "north_america", "us_northeast")),
    ("sources/us/tx/city_of_mckinney.json", ("global", "north_america", "us_south")),
    ("sources/us/dc/statewide.json", ("global", "north_america", "us_south")),
    ("sources/us/ak/anchorage.json", ("global", "north_america", "us_west")),
    ("sources/us/pa/philadelphia.json", ("global", "north_america", "us_northeast")),
    ("sources/us/wi/marathon.json", ("global", "north_america", "us_midwest")),
    # Territories are in none of the four Census regions.
    ("sources/us/pr/statewide.json", ("global", "north_america")),
    ("sources/us/gu/statewide.json", ("global", "north_america")),
    # Countrywide, directly under us/.
    ("sources/us/countrywide.json", ("global", "north_america")),
    # An unknown state folder: the country still counts.
    ("sources/us/zz/somewhere.json", ("global", "north_america")),
    ("sources/ca/qc/province.json", ("global", "north_america")),
    ("sources/mx/countrywide.json", ("global", "north_america")),
    ("sources/pr/statewide.json", ("global", "north_america")),
    ("sources/fr/01/statewide.json", ("global", "europe")),
    ("sources/de/hh/statewide.json", ("global", "europe")),
    ("sources/be/wal/bosa-region-wallonia-fr.json", ("global", "europe")),
    ("sources/ru/countrywide.json", ("global", "europe")),
    ("sources/cy/countrywide.json", ("global", "europe")),
    ("sources/tr/istanbul.json", ("global", "asia")),
    ("sources/jp/tokyo.json", ("global", "asia")),
    ("sources/tw/ila/datong.json", ("global", "asia")),
    ("sources/kz/countrywide.json", ("global", "asia")),
    ("sources/eg/cairo.json", ("global", "africa")),
    ("sources/za/countrywide.json", ("global", "africa")),
    ("sources/br/sp/sao_paulo.json", ("global", "south_america")),
    ("sources/au/nsw.json", ("global", "oceania")),
    ("sources/nz/countrywide.json", ("global", "oceania")),
    ("sources/aq/station.json", ("global", "antarctica")),
    # Not a country code, or no folder at all: global only.
    ("sources/xx/test.json", ("global",)),
    ("sources/world.json", ("global",)),
    # Written without sources/, upper case, or with backslashes: the same rule.
    ("us/ks/lane_county", ("global", "north_america", "us_midwest")),
    ("sources/US/KS/Lane_County.json", ("global", "north_america", "us_midwest")),
    ("sources\\fr\\01\\statewide.json", ("global", "europe")),
]


@pytest.mark.parametrize(("path", "regions"), TABLE)
def test_regions_of(path: str, regions: tuple[str, ...]) -> None:
    assert regions_of(path) == regions


def test_every_region_is_known() -> None:
    for _path, regions in TABLE:
        assert set(regions) <= set(REGIONS)


def test_every_iso_country_has_one_continent() -> None:
    codes = {country.alpha2.lower() for country in iso3166.countries}
    assert codes - CONTINENTS.keys() == set()
    assert CONTINENTS.keys() - codes == set()


def test_census_regions_cover_fifty_states_and_dc() -> None:
    in_regions = [state for state in US_STATES.values() if state.census_region]
    assert len(in_regions) == 51
    counts = {region: sum(s.census_region == region for s in in_regions)
              for region in ("us_northeast", "us_midwest", "us_south", "us_west")}
    assert counts == {"us_northeast": 9, "us_midwest": 12, "us_south": 17, "us_west": 13}
    assert len({state.fips for state in US_STATES.values()}) == len(US_STATES)


def test_country_of() -> None:
    assert country_of("sources/fr/01/statewide.json") == "fr"
    assert country_of("sources/xx/a.json") is None


def test_check_region() -> None:
    assert check_region("europe") == "europe"
    with pytest.raises(ValueError, match="known: global"):
        check_region("atlantis")
