"""The ``fm_embeddings`` feature view: the foundation model's user embeddings, over time.

LoopFM (see ``training.embeddings``) runs the foundation model over each user's recent
events and stores the user's intermediate embedding here, stamped with the time it was
computed as of. Run periodically, the offline store accumulates the *history* of
representations, so a training example joined point-in-time sees the embeddings as they
were when it happened, never a later one; serving reads only the latest row online.

``fm_history`` carries the user's last K embeddings (newest first, flattened, zeros past
``fm_history_len``) inside the row itself: a point-in-time join returns one row per
example, and this way that row already holds the sequence a vertical model pools over.
The vector lengths depend on the model and are recorded in the view's tags.
"""

from __future__ import annotations

from features.definitions import Feature, FeatureGroup

FM_EMBEDDING = "fm_embedding"
FM_HISTORY = "fm_history"
FM_HISTORY_LEN = "fm_history_len"

FM_EMBEDDINGS = FeatureGroup(
    "fm_embeddings",
    "user",
    "user_id",
    (),
    description="Foundation-model user embeddings (LoopFM), one row per user and materialization run.",
    extra=(
        Feature(FM_EMBEDDING, "float_list", "the user's latest foundation-model embedding"),
        Feature(FM_HISTORY, "float_list", "the user's last K embeddings, newest first, flattened"),
        Feature(FM_HISTORY_LEN, "int64", "how many of the K history slots are filled"),
    ),
    computed_by="adreach features fm-embeddings",
)

MODEL_FEATURE_GROUPS: tuple[FeatureGroup, ...] = (FM_EMBEDDINGS,)
"""Feature views written by model jobs rather than stream engines."""
