"""Which regional collections a source belongs to, from its path in the sources repository.

The rule, in one place (the collections and the downloads page read it from here):

* Every source is in ``global``.
* The first folder under ``sources/`` is an ISO 3166-1 alpha-2 country code
  (``sources/fr/01/statewide.json`` → ``fr``). The country's continent (:data:`CONTINENTS`)
  names a second region: ``africa``, ``antarctica``, ``asia``, ``europe``, ``north_america``,
  ``oceania``, ``south_america``. A country that spans two continents is in the one where most
  of its people live (Russia and Cyprus in Europe; Turkey, Kazakhstan and the Caucasus in Asia;
  Egypt in Africa). A folder that is no country code (``sources/xx/...``) gives ``global``
  only.
* A United States source (``sources/us/{state}/...``) is also in its state's Census Bureau
  region (:data:`US_STATES`): ``us_northeast``, ``us_midwest``, ``us_south``, ``us_west``. The
  territories (``pr``, ``gu``, ``vi``, ``as``, ``mp``) are in none of the four: the Census
  regions cover the fifty states and the District of Columbia only. A source directly under
  ``sources/us/`` (countrywide) is in ``north_america`` and ``global``.

So a Kansas county is in ``global``, ``north_america`` and ``us_midwest``: the same data in
three zips, each for people who want that much of the world.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Final

GLOBAL: Final = "global"

#: ISO 3166-1 alpha-2 codes (lower case) of each continent; every assigned code is in one.
_CONTINENT_CODES: Final[dict[str, str]] = {
    "africa": """
        ao bf bi bj bw cd cf cg ci cm cv dj dz eg eh er et ga gh gm gn gq gw ke km lr ls ly ma
        mg ml mr mu mw mz na ne ng re rw sc sd sh sl sn so ss st sz td tg tn tz ug yt za zm zw
    """,
    "antarctica": "aq bv hm tf",
    "asia": """
        ae af am az bd bh bn bt cc cn cx ge hk id il in io iq ir jo jp kg kh kp kr kw kz la lb
        lk mm mn mo mv my np om ph pk ps qa sa sg sy th tj tl tm tr tw uz vn ye
    """,
    "europe": """
        ad al at ax ba be bg by ch cy cz de dk ee es fi fo fr gb gg gi gr hr hu ie im is it je
        li lt lu lv mc md me mk mt nl no pl pt ro rs ru se si sj sk sm ua va xk
    """,
    "north_america": """
        ag ai aw bb bl bm bq bs bz ca cr cu cw dm do gd gl gp gt hn ht jm kn ky lc mf mq ms mx
        ni pa pm pr sv sx tc tt um us vc vg vi
    """,
    "oceania": """
        as au ck fj fm gu ki mh mp nc nf nr nu nz pf pg pn pw sb tk to tv vu wf ws
    """,
    "south_america": "ar bo br cl co ec fk gf gs gy pe py sr uy ve",
}

#: Continent region of each country code (lower case).
CONTINENTS: Final[dict[str, str]] = {
    code: continent
    for continent, codes in _CONTINENT_CODES.items()
    for code in codes.split()
}

US_REGIONS: Final = ("us_northeast", "us_midwest", "us_south", "us_west")


@dataclass(frozen=True)
class UsState:
    """A state (or DC, or a territory) by its postal code: its FIPS code (the US Census GEOID
    of the state) and its Census region (``None`` for the territories)."""

    postal: str
    fips: str
    census_region: str | None


_US_STATE_ROWS: Final = """
    al 01 us_south      ak 02 us_west       az 04 us_west       ar 05 us_south
    ca 06 us_west       co 08 us_west       ct 09 us_northeast  de 10 us_south
    dc 11 us_south      fl 12 us_south      ga 13 us_south      hi 15 us_west
    id 16 us_west       il 17 us_midwest    in 18 us_midwest    ia 19 us_midwest
    ks 20 us_midwest    ky 21 us_south      la 22 us_south      me 23 us_northeast
    md 24 us_south      ma 25 us_northeast  mi 26 us_midwest    mn 27 us_midwest
    ms 28 us_south      mo 29 us_midwest    mt 30 us_west       ne 31 us_midwest
    nv 32 us_west       nh 33 us_northeast  nj 34 us_northeast  nm 35 us_west
    ny 36 us_northeast  nc 37 us_south      nd 38 us_midwest    oh 39 us_midwest
    ok 40 us_south      or 41 us_west       pa 42 us_northeast  ri 44 us_northeast
    sc 45 us_south      sd 46 us_midwest    tn 47 us_south      tx 48 us_south
    ut 49 us_west       vt 50 us_northeast  va 51 us_south      wa 53 us_west
    wv 54 us_south      wi 55 us_midwest    wy 56 us_west
    as 60 -             gu 66 -             mp 69 -             pr 72 -
    vi 78 -
"""


def _us_states() -> dict[str, UsState]:
    words = _US_STATE_ROWS.split()
    rows = zip(words[0::3], words[1::3], words[2::3], strict=True)
    return {postal: UsState(postal, fips, None if region == "-" else region)
            for postal, fips, region in rows}


#: Every state, DC and territory by lower-case postal code.
US_STATES: Final[dict[str, UsState]] = _us_states()

#: Every region a collection may be built for, in the order the downloads page lists them.
REGIONS: Final[tuple[str, ...]] = (
    GLOBAL, *sorted(_CONTINENT_CODES), *US_REGIONS,
)


def source_folders(source_path: str) -> list[str]:
    """The folders of a source path under ``sources/`` (``us/ks/lane_county`` → us, ks,
    lane_county), lower case, without ``.json``."""
    parts = list(PurePosixPath(source_path.replace("\\", "/").strip("/")).parts)
    if parts and parts[0] == "sources":
        parts = parts[1:]
    if parts:
        parts[-1] = parts[-1].removesuffix(".json")
    return [part.lower() for part in parts]


def country_of(source_path: str) -> str | None:
    """The source's ISO 3166-1 alpha-2 country code (lower case), if its first folder is one."""
    folders = source_folders(source_path)
    if len(folders) >= 2 and folders[0] in CONTINENTS:
        return folders[0]
    return None


def regions_of(source_path: str) -> tuple[str, ...]:
    """The regions whose collections hold this source: ``global`` first, then its continent,
    then its US Census region (see the module's docstring for the rule)."""
    found = [GLOBAL]
    country = country_of(source_path)
    if country is None:
        return tuple(found)
    found.append(CONTINENTS[country])
    folders = source_folders(source_path)
    if country == "us" and len(folders) >= 3:
        state = US_STATES.get(folders[1])
        if state is not None and state.census_region is not None:
            found.append(state.census_region)
    return tuple(found)


def check_region(name: str) -> str:
    """``name`` if it is a known region, else :class:`ValueError` naming the known ones."""
    if name not in REGIONS:
        raise ValueError(f"unknown region {name!r}; known: {', '.join(REGIONS)}")
    return name
