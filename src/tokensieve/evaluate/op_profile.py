"""Where a prefill's time goes, operator by operator (``bench speed --profile``): one call of the pruned
prefill and one of its native bound under ``torch.profiler``, so that a gap between them can be read as
the operators the pruned one runs more of, or longer.

A profiled call is slower than a timed one (the profiler records every operator), and one call carries
the machine's noise: the totals say where the time goes, the timed medians say how much there is.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile


def op_times(prefill: Callable[[], object], sync: Callable[[], None], device: str = "cpu") -> dict[str, float]:
    """``{operator: ms}``: the self time of every operator in one call of ``prefill``, on the device that
    runs it, largest first; ``sync`` waits for the device. On a CPU its host time; on CUDA the device time
    of the kernels each host-side operator launched (the kernels' own events are left out: counting them
    too would count every kernel twice)."""
    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync()
    with profile(activities=activities) as prof, torch.no_grad():
        prefill()
        sync()
    field = "self_device_time_total" if cuda else "self_cpu_time_total"
    times = {event.key: getattr(event, field) / 1000 for event in prof.key_averages()
             if event.device_type == DeviceType.CPU}
    return dict(sorted(((k, round(v, 3)) for k, v in times.items() if v > 0), key=lambda kv: -kv[1]))


def profile_pair(pruned: Callable[[], object], bound: Callable[[], object], sync: Callable[[], None],
                 device: str = "cpu", top: int = 12) -> dict:
    """``{"pruned_ms", "bound_ms", "ops": [{"op", "pruned_ms", "bound_ms", "extra_ms"}]}``: one profiled call
    of each (totals of operator self times), and the ``top`` operators by the time the pruned call spends on
    them beyond the bound's (negative: less)."""
    ran = {"pruned": op_times(pruned, sync, device), "bound": op_times(bound, sync, device)}
    ops = [{"op": op, "pruned_ms": ran["pruned"].get(op, 0.0), "bound_ms": ran["bound"].get(op, 0.0)}
           for op in dict.fromkeys([*ran["pruned"], *ran["bound"]])]
    for op in ops:
        op["extra_ms"] = round(op["pruned_ms"] - op["bound_ms"], 3)
    ops.sort(key=lambda op: -abs(op["extra_ms"]))
    return {"pruned_ms": round(sum(ran["pruned"].values()), 2), "bound_ms": round(sum(ran["bound"].values()), 2),
            "ops": ops[:top]}
