"""Public fused ops. Each takes ``impl="auto"|"reference"|"triton"|"cuda"``."""
from lgvq_fast.ops.nearest_code import nearest_code
from lgvq_fast.ops.ema import ema_update_
from lgvq_fast.ops.relation import relation_loss
from lgvq_fast.ops.group_norm import group_norm
from lgvq_fast.ops.lpips import lpips_distance

__all__ = ["nearest_code", "ema_update_", "relation_loss", "group_norm", "lpips_distance"]
