"""A population of users with correlated attributes and hidden tastes.

Correlations are built in on purpose, because reach estimation (stratification) and
data-quality work only mean something when attributes depend on each other:
country -> region, language and iOS share; age -> device mix and activity; age,
gender and country -> a latent taste vector -> interest segments. Small minorities
(e.g. Iceland, 65+ on connected TV) exist so fall-back strategies can be exercised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numpy.typing import NDArray

from streams.simulation.topics import SEGMENTS

COUNTRIES = np.array(
    [
        "US",
        "GB",
        "DE",
        "FR",
        "IN",
        "BR",
        "JP",
        "CA",
        "ES",
        "IT",
        "MX",
        "AU",
        "NL",
        "SE",
        "PL",
        "TR",
        "KR",
        "ZA",
        "AR",
        "IE",
        "NZ",
        "SG",
        "PT",
        "NO",
        "IS",
    ]
)
_COUNTRY_WEIGHTS = np.array(
    [30, 8, 8, 7, 7, 6, 5, 4, 4, 4, 3, 3, 2, 1.5, 1.5, 1.2, 1.2, 1, 0.8, 0.6, 0.5, 0.4, 0.4, 0.3, 0.2]
)
COUNTRY_P = _COUNTRY_WEIGHTS / _COUNTRY_WEIGHTS.sum()
_LANGUAGE = {
    "US": "en",
    "GB": "en",
    "CA": "en",
    "AU": "en",
    "IE": "en",
    "NZ": "en",
    "SG": "en",
    "ZA": "en",
    "IN": "en",
    "DE": "de",
    "FR": "fr",
    "BR": "pt",
    "PT": "pt",
    "JP": "ja",
    "ES": "es",
    "MX": "es",
    "AR": "es",
    "IT": "it",
    "NL": "nl",
    "SE": "sv",
    "PL": "pl",
    "TR": "tr",
    "KR": "ko",
    "NO": "no",
    "IS": "is",
}
_IOS_SHARE = {"US": 0.55, "JP": 0.65, "GB": 0.5, "CA": 0.5, "AU": 0.5, "SE": 0.45, "DE": 0.35, "FR": 0.35}
_REGIONS = {
    "US": ["CA", "TX", "NY", "FL", "IL", "WA"],
    "DE": ["BY", "NW", "BE", "HH", "BW"],
    "GB": ["ENG", "SCT", "WLS", "NIR"],
    "FR": ["IDF", "ARA", "PAC", "OCC"],
    "IN": ["MH", "DL", "KA", "TN"],
    "BR": ["SP", "RJ", "MG"],
    "JP": ["13", "27", "14"],
    "CA": ["ON", "QC", "BC"],
}
AGE_BANDS = np.array(["18-24", "25-34", "35-44", "45-54", "55-64", "65+"])
_AGE_EDGES = np.array([18, 25, 35, 45, 55, 65])
GENDERS = np.array(["female", "male", "unknown"])
DEVICES = np.array(["mobile", "desktop", "tablet", "ctv"])
TASTE_DIM = 8


@dataclass
class Population:
    """Users as NumPy columns (codes index into the module's category arrays)."""

    user_ids: pa.StringArray
    country: NDArray[Any]  # int codes into COUNTRIES
    region: NDArray[Any]  # strings
    age: NDArray[Any]
    age_band: NDArray[Any]  # int codes into AGE_BANDS
    gender: NDArray[Any]  # int codes into GENDERS
    device: NDArray[Any]  # int codes into DEVICES
    os: NDArray[Any]  # strings
    language: NDArray[Any]  # strings
    taste: NDArray[Any]  # float32 (n, TASTE_DIM), hidden
    interests: NDArray[Any]  # bool (n, len(SEGMENTS))
    activity_rate: NDArray[Any]  # impressions per day
    search_rate: NDArray[Any]  # searches per day
    joined_ms: NDArray[Any]  # int64 epoch ms
    deleted_ms: NDArray[Any]  # int64 epoch ms, -1 = never

    def __len__(self) -> int:
        return len(self.age)

    def extend(self, other: Population) -> None:
        """Append new users (a new traffic source) in place."""
        for name in self.__dataclass_fields__:
            mine, theirs = getattr(self, name), getattr(other, name)
            if isinstance(mine, pa.Array):
                setattr(self, name, pa.concat_arrays([mine, theirs]))
            else:
                setattr(self, name, np.concatenate([mine, theirs]))


def _user_ids(first: int, count: int) -> pa.StringArray:
    numbers = pc.cast(pa.array(np.arange(first, first + count, dtype=np.int64)), pa.string())
    return pc.binary_join_element_wise("u", pc.utf8_lpad(numbers, width=7, padding="0"), "")


def build_population(
    rng: np.random.Generator,
    count: int,
    *,
    first_id: int,
    joined_ms: int,
    topic_vectors: NDArray[Any],
    topic_popularity: NDArray[Any],
    country_p: NDArray[Any] = COUNTRY_P,
    device_bias: NDArray[Any] | None = None,
    taste_offset: NDArray[Any] | None = None,
) -> Population:
    """Draw ``count`` users. Keyword arguments let a new traffic source differ from the rest."""
    country = rng.choice(len(COUNTRIES), size=count, p=country_p)
    codes = COUNTRIES[country]

    # Age: a country-dependent median (younger populations in IN/BR/MX/TR/ZA/AR).
    young = np.isin(codes, ["IN", "BR", "MX", "TR", "ZA", "AR"])
    median = np.where(young, 30.0, 40.0)
    age = np.clip(np.round(rng.gamma(shape=6.0, scale=median / 6.0) + 10), 18, 90).astype(np.int32)
    age_band = np.searchsorted(_AGE_EDGES, age, side="right") - 1
    gender = rng.choice(3, size=count, p=[0.49, 0.49, 0.02])

    # Device: mobile falls and desktop/tablet/ctv rise with age.
    older = (age - 18) / 60.0
    device_logits = np.stack(
        [2.0 - 1.5 * older, 0.8 + 0.8 * older, -0.6 + 1.0 * older, -1.6 + 0.9 * older], axis=1
    )
    if device_bias is not None:
        device_logits = device_logits + device_bias
    device = _categorical(rng, device_logits)

    ios_share = np.array([_IOS_SHARE.get(c, 0.25) for c in COUNTRIES])[country]
    u = rng.random(count)
    os = np.where(
        device == 0,
        np.where(u < ios_share, "ios", "android"),
        np.where(
            device == 1,
            np.where(u < 0.75, "windows", np.where(u < 0.95, "macos", "linux")),
            np.where(
                device == 2,
                np.where(u < 0.6, "ipados", "android"),
                np.where(u < 0.4, "tizen", np.where(u < 0.75, "roku", "tvos")),
            ),
        ),
    ).astype(object)

    region = np.empty(count, dtype=object)
    for c in np.unique(country):
        rows = np.nonzero(country == c)[0]
        names = _REGIONS.get(str(COUNTRIES[c]), ["1", "2", "3"])
        weights = 1.0 / np.arange(1, len(names) + 1)
        region[rows] = np.array([f"{COUNTRIES[c]}-{n}" for n in names], dtype=object)[
            rng.choice(len(names), size=rows.size, p=weights / weights.sum())
        ]
    language = np.array([_LANGUAGE[c] for c in COUNTRIES], dtype=object)[country]
    language = np.where(rng.random(count) < 0.08, "en", language).astype(object)

    # Hidden taste: demographic offsets + individual noise. Interests follow from it.
    taste_rng = np.random.default_rng(rng.integers(2**63))
    age_offsets = taste_rng.normal(0, 0.7, size=(len(AGE_BANDS), TASTE_DIM))
    gender_offsets = taste_rng.normal(0, 0.7, size=(len(GENDERS), TASTE_DIM))
    country_offsets = taste_rng.normal(0, 0.4, size=(len(COUNTRIES), TASTE_DIM))
    taste = (
        age_offsets[age_band]
        + gender_offsets[gender]
        + country_offsets[country]
        + rng.normal(0, 0.8, size=(count, TASTE_DIM))
    )
    if taste_offset is not None:
        taste = taste + taste_offset
    taste = taste.astype(np.float32)
    interests = draw_interests(rng, taste, topic_vectors, topic_popularity)

    device_activity = np.array([0.2, 0.0, -0.2, 0.4])[device]
    activity_rate = np.exp(rng.normal(np.log(6.0) + device_activity - 0.4 * older, 0.9))
    search_rate = np.exp(rng.normal(np.log(0.8) - 0.5 * older, 0.8))

    return Population(
        user_ids=_user_ids(first_id, count),
        country=country,
        region=region,
        age=age,
        age_band=age_band,
        gender=gender,
        device=device,
        os=os,
        language=language,
        taste=taste,
        interests=interests,
        activity_rate=activity_rate,
        search_rate=search_rate,
        joined_ms=np.full(count, joined_ms, dtype=np.int64),
        deleted_ms=np.full(count, -1, dtype=np.int64),
    )


def affinity(taste: NDArray[Any], topic_vectors: NDArray[Any]) -> NDArray[Any]:
    """User x topic affinity: the hidden signal behind interests, searches and clicks."""
    return np.asarray(taste @ topic_vectors.T)


def draw_interests(
    rng: np.random.Generator, taste: NDArray[Any], topic_vectors: NDArray[Any], topic_popularity: NDArray[Any]
) -> NDArray[Any]:
    """1 + Poisson(2.5) segments per user, chosen by affinity + popularity + Gumbel noise."""
    scores = (
        affinity(taste, topic_vectors)
        + np.log(topic_popularity)
        + rng.gumbel(size=(len(taste), len(SEGMENTS)))
    )
    k = np.minimum(1 + rng.poisson(2.5, size=len(taste)), len(SEGMENTS))
    ranks = np.argsort(np.argsort(-scores, axis=1), axis=1)
    return ranks < k[:, None]


def _categorical(rng: np.random.Generator, logits: NDArray[Any]) -> NDArray[Any]:
    """One categorical draw per row via the Gumbel-max trick (vectorized)."""
    return np.asarray(np.argmax(logits + rng.gumbel(size=logits.shape), axis=1))


def segment_lists(mask: NDArray[Any], names: NDArray[Any]) -> pa.ListArray:
    """A list<string> column from a boolean (rows x categories) membership matrix."""
    rows, cols = np.nonzero(mask)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=mask.shape[0]))]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(names[cols], type=pa.string()))
