"""Pure planning: (seed, sources' shard sizes, weight history, position) -> (source, shard, item)."""

from fastmix_data.plan.partition import DEFAULT_PARTITIONS, Partitioning, SourceLayout
from fastmix_data.plan.planner import Exhaustion, MixturePlan, PlanSlice, WeightChange
from fastmix_data.plan.schedule import prefix_counts, schedule_range
from fastmix_data.plan.weights import normalize_weights

__all__ = [
    "DEFAULT_PARTITIONS", "Exhaustion", "MixturePlan", "Partitioning", "PlanSlice", "SourceLayout", "WeightChange",
    "prefix_counts", "schedule_range", "normalize_weights",
]  # fmt: skip
