"""Training examples: one per impression, with its candidate, context and observed labels.

Labels are what the simulator's users actually did: ``click`` is 1 when a click event
names the impression, ``conversion`` is 1 when a conversion names that click. The
simulator's ground-truth click probability (``truth/impressions.parquet``) is attached
when present, for an oracle row in evaluations; it is never a training input.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from numpy.typing import NDArray

from infra.arrow_times import epoch_ms
from training.events import EventLog, category_codes, stable_bucket, topic_codes

DAY_MS = 86_400_000


@dataclass
class Examples:
    example_id: NDArray[Any]  # object: the impression's event_id
    user_id: NDArray[Any]
    ad_id: NDArray[Any]
    campaign_id: NDArray[Any]
    advertiser_id: NDArray[Any]
    user: NDArray[np.int64]  # index into the EventLog (-1: unknown user)
    time_ms: NDArray[np.int64]
    ad: NDArray[np.int64]
    campaign: NDArray[np.int64]
    advertiser: NDArray[np.int64]
    topic: NDArray[np.int64]
    position: NDArray[np.int64]
    placement: NDArray[np.int64]
    device: NDArray[np.int64]
    hour: NDArray[np.int64]
    click: NDArray[np.float32]
    conversion: NDArray[np.float32]
    p_click: NDArray[np.float64]  # ground truth, NaN when unknown

    def __len__(self) -> int:
        return len(self.example_id)

    def take(self, index: NDArray[Any]) -> Examples:
        return Examples(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def candidate(self) -> dict[str, NDArray[np.int64]]:
        """Candidate and context columns, as the models' ``candidate`` inputs."""
        names = ("ad", "campaign", "advertiser", "topic", "position", "placement", "device", "hour")
        return {name: getattr(self, name) for name in names}


def build_examples(events: pa.Table, log: EventLog, truth_impressions: Path | None = None) -> Examples:
    """Every impression in ``events`` with its labels (see the module docstring), in time order."""
    kinds = events.column("type")
    impressions = events.filter(pc.equal(kinds, "impression"))
    clicks = events.filter(pc.equal(kinds, "click"))
    conversions = events.filter(pc.equal(kinds, "conversion"))
    converted_clicks = conversions.column("click_id").drop_null()
    click_converted = pc.is_in(clicks.column("event_id"), value_set=converted_clicks.combine_chunks())
    converted_impressions = clicks.filter(click_converted).column("impression_id").combine_chunks()
    event_id = impressions.column("event_id").combine_chunks()
    click = pc.is_in(event_id, value_set=clicks.column("impression_id").combine_chunks())
    conversion = pc.is_in(event_id, value_set=converted_impressions)
    time_ms = np.asarray(epoch_ms(impressions.column("event_time")).to_numpy(), np.int64)
    index = log.user_index
    user_id = impressions.column("user_id").to_numpy(zero_copy_only=False).astype(object)
    user = np.fromiter((index.get(u, -1) for u in user_id), np.int64, len(user_id))
    ad_column = impressions.column("ad_id").combine_chunks()
    p_click = np.full(len(event_id), np.nan)
    if truth_impressions is not None and truth_impressions.exists():
        truth = pq.read_table(truth_impressions, columns=["event_id", "p_click"])
        position = pc.index_in(event_id, value_set=truth.column("event_id").combine_chunks())
        found = np.asarray(position.is_valid().to_numpy(zero_copy_only=False), bool)
        values = truth.column("p_click").to_numpy()
        p_click[found] = values[np.asarray(position.fill_null(0).to_numpy(zero_copy_only=False))[found]]
    examples = Examples(
        example_id=event_id.to_numpy(zero_copy_only=False).astype(object),
        user_id=user_id,
        ad_id=ad_column.to_numpy(zero_copy_only=False).astype(object),
        campaign_id=impressions.column("campaign_id").to_numpy(zero_copy_only=False).astype(object),
        advertiser_id=impressions.column("advertiser_id").to_numpy(zero_copy_only=False).astype(object),
        user=user,
        time_ms=time_ms,
        ad=stable_bucket(ad_column, log.buckets.ads),
        campaign=stable_bucket(impressions.column("campaign_id"), log.buckets.campaigns),
        advertiser=stable_bucket(impressions.column("advertiser_id"), log.buckets.advertisers),
        topic=topic_codes(ad_column, log.ad_topics, log.topics),
        position=np.clip(np.asarray(impressions.column("position").fill_null(1).to_numpy(), np.int64), 1, 5),
        placement=category_codes(impressions.column("placement"), log.buckets.placements),
        device=category_codes(impressions.column("device"), log.buckets.devices),
        hour=(time_ms % DAY_MS) // 3_600_000,
        click=np.asarray(click.to_numpy(zero_copy_only=False), np.float32),
        conversion=np.asarray(conversion.to_numpy(zero_copy_only=False), np.float32),
        p_click=p_click,
    )
    return examples.take(np.argsort(time_ms, kind="stable"))
