"""Parameter specs shared by several methods (mergekit names and defaults)."""

from deltawise.merge.params import Param

WEIGHT = Param("weight", float, 1.0, scope="model", help="coefficient of this model's tensors or task vector")
LAMBDA = Param("lambda", float, 1.0, help="scale of the combined task vector added to the base")
DENSITY = Param(
    "density", float, 1.0, scope="model", low=0.0, high=1.0,
    help="fraction of task-vector entries kept (mergekit default 1.0 keeps all; the papers use 0.1-0.2)",
)
INT8_MASK = Param("int8_mask", bool, False, help="accepted for mergekit compatibility; no effect (masks are boolean here)")


def normalize(default: bool) -> Param:
    return Param("normalize", bool, default, help="divide by the summed weights (of agreeing models, with sign consensus)")
