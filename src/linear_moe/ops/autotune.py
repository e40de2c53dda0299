"""How many Triton configs fla's autotuners try: `full` (fla's own lists), `few` or `one`.

fla autotunes each Triton kernel over its config list the first time it meets a shape. On a cold machine compiling
every config of every kernel a model uses takes minutes (the A0.3B-2B step outlasted 265 s), which is fine for a
long training run and wasteful for a test suite or a quick benchmark. `limit_autotune("few")` keeps three configs
spread over the list ordered by resource use (block sizes, stages, warps); `"one"` keeps the config that needs
the fewest resources (values do not depend on the config, so tests use it). Call it before the first fla kernel
runs: it wraps `triton.runtime.autotuner.Autotuner.__init__`, which runs when fla's kernel modules are imported.
"""

from __future__ import annotations

MODES = ("full", "few", "one")
_mode = "full"


def _resources(config) -> tuple:
    size = 1
    for v in config.kwargs.values():
        if isinstance(v, int):
            size *= max(v, 1)
    return (size, config.num_stages or 0, config.num_warps or 0)


def pick_configs(configs: list, mode: str) -> list:
    """The configs kept for `mode`: all, three spread by resource use (quartiles), or the smallest."""
    if mode == "full" or len(configs) <= 1:
        return list(configs)
    ordered = sorted(configs, key=_resources)
    if mode == "one":
        return ordered[:1]
    n = len(ordered)
    picks = sorted({min(n - 1, (n * q) // 4) for q in (1, 2, 3)})
    return [ordered[i] for i in picks]


def pick_after(prune):
    """`prune` (a Triton `early_config_prune`) followed by `pick_configs` in the current mode."""

    def pruned_then_picked(configs, nargs, **kwargs):
        return pick_configs(list(prune(configs, nargs, **kwargs)), _mode)

    return pruned_then_picked


def limit_autotune(mode: str) -> None:
    """Make every Triton autotuner created from now on keep `pick_configs(configs, mode)`."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"autotune mode {mode!r}: choose one of {', '.join(MODES)}")
    _mode = mode
    try:
        from triton.runtime import autotuner
    except ImportError:  # no Triton (CPU-only install): nothing to limit
        return
    init = autotuner.Autotuner.__init__
    if getattr(init, "_linear_moe_limited", False):
        return

    def limited_init(self, fn, arg_names, configs, *args, **kwargs):
        configs = list(configs)
        init(self, fn, arg_names, configs, *args, **kwargs)
        prune = getattr(self, "early_config_prune", None)
        if prune is None:
            self.configs = pick_configs(configs, _mode)
        else:  # the kernel's own pruning (shapes, shared memory) sees the full list; we pick among the survivors
            self.early_config_prune = pick_after(prune)

    limited_init._linear_moe_limited = True
    autotuner.Autotuner.__init__ = limited_init
