"""GPU test session setup: one Triton config per fla kernel unless LINEAR_MOE_TEST_AUTOTUNE=full (or few).

fla autotunes each Triton kernel over tens of configs, and on a cold machine compiling them all takes most of a
GPU test run (minutes per kernel family). These tests check values, which do not depend on the config, so each
autotuner keeps the config that needs the fewest resources (smallest blocks, fewest stages): one compile per
kernel, no benchmarking. Speed is measured by `linear-moe bench` (src/linear_moe/bench/), which
autotune fully unless told `--autotune few|one` (`linear_moe.ops.autotune`).
"""

from __future__ import annotations

import os

from linear_moe.ops.autotune import limit_autotune

limit_autotune(os.environ.get("LINEAR_MOE_TEST_AUTOTUNE", "one"))
