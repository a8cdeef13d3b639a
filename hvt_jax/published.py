"""The official release's weights by name: which file each published model is, and what it scores.

A table only, with no dependencies, so that anything may read the names (`summary`, the notebooks'
checks) without what downloads and converts them (`interop/weights.py`).
"""
from __future__ import annotations

from typing import NamedTuple

RELEASE_URL = 'https://github.com/zhuang-group/HVT/releases/download'


class Published(NamedTuple):
  file: str  # path under the release URL
  params: int  # parameter count of the published model
  top1: float  # the release's ImageNet val accuracy (%)
  top5: float


# hvt-s-4 is the file the release calls "Scale HVT-Ti-4": 6 heads (384 wide) with pooling every
# 3 blocks, i.e. exactly the HVT-S-4 shapes, hence its name here (HVT-Ti-4 would be 192 wide).
PUBLISHED: dict[str, Published] = {
    'hvt-ti-1': Published('v1.0/hvt_ti_1.pth', 5_735_656, 69.64, 89.40),
    'hvt-s-0': Published('v1.0/hvt_s_0.pth', 22_049_896, 80.39, 95.13),
    'hvt-s-1': Published('v1.1/hvt_s_1.pth', 22_087_144, 78.00, 93.83),
    'hvt-s-2': Published('v1.0/hvt_s_2.pth', 22_105_576, 77.36, 93.55),
    'hvt-s-3': Published('v1.0/hvt_s_3.pth', 22_114_408, 76.32, 92.90),
    'hvt-s-4': Published('v1.0/scale_hvt_ti_4.pth', 22_118_632, 75.23, 92.30),
}
