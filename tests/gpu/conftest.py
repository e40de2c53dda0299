"""GPU test session setup: one Triton config per fla kernel unless LINEAR_MOE_TEST_AUTOTUNE=full.

fla autotunes each Triton kernel over tens of configs, and on a cold machine compiling them all takes most of a
GPU test run (minutes per kernel family). These tests check values, which do not depend on the config, so each
autotuner keeps the config that needs the fewest resources (smallest blocks, fewest stages): one compile per
kernel, no benchmarking. Speed is measured by `linear-moe bench` / `python -m linear_moe.model.bench`, which
autotune fully.
"""

from __future__ import annotations

import os


def _smallest(config) -> tuple:
    ints = [v for v in config.kwargs.values() if isinstance(v, int)]
    size = 1
    for v in ints:
        size *= max(v, 1)
    return (size, config.num_stages or 0, config.num_warps or 0)


def _keep_one_config() -> None:
    try:
        from triton.runtime import autotuner
    except ImportError:
        return
    init = autotuner.Autotuner.__init__
    if getattr(init, "_linear_moe_one_config", False):
        return

    def one_config_init(self, fn, arg_names, configs, *args, **kwargs):
        configs = list(configs)
        if len(configs) > 1:
            configs = [min(configs, key=_smallest)]
        init(self, fn, arg_names, configs, *args, **kwargs)

    one_config_init._linear_moe_one_config = True
    autotuner.Autotuner.__init__ = one_config_init


if os.environ.get("LINEAR_MOE_TEST_AUTOTUNE", "one") != "full":
    _keep_one_config()
