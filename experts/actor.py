"""Ray shell over `ExpertPool`: one actor process per pool replica."""

from __future__ import annotations

import ray

from experts.pool import ExpertPool


@ray.remote
class ExpertPoolActor(ExpertPool):
    """`ExpertPool` as a Ray actor; calls run one at a time, in arrival order."""
