"""The scale-out path: the stream features as an Apache Flink job (``adreach stream flink``).

:mod:`~streams.flink.sql` generates the job's Flink SQL from :mod:`features.definitions`
(the same definitions the embedded engine compiles to DuckDB), :mod:`~streams.flink.job`
runs it on a local mini-cluster or submits it to a cluster, :mod:`~streams.flink.writer`
carries its output into Feast, and :mod:`~streams.flink.replay` records a Kafka topic as
the per-partition files the filesystem source replays.
"""
