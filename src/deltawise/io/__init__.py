"""Checkpoints in and out: lazy readers, hub resolution, streaming sharded writer."""

from deltawise.io.reader import ModelReader, TensorInfo
from deltawise.io.resolve import resolve_model
from deltawise.io.writer import ShardPlan, StreamingShardWriter, plan_shards

__all__ = [
    "ModelReader",
    "TensorInfo",
    "resolve_model",
    "ShardPlan",
    "StreamingShardWriter",
    "plan_shards",
]
