"""The precopy policy a live migration asks of ``pyxl-save-helper``.

This module owns :func:`precopy_env`: checked options (downtime target, round
limit, what to do when the target is missed) turned into the helper's
``PYXL_PRECOPY*`` environment, which the helper reads in save mode (unset:
Xen's own policy).  It imports nothing but typing.
"""

from __future__ import annotations

from typing import Dict, Literal, Optional

__all__ = ["OnFail", "precopy_env"]

#: What a downtime-target migration does when the target is not met in time.
OnFail = Literal["abort", "stop"]


def precopy_env(downtime_ms: Optional[float] = None, max_iterations: Optional[int] = None,
                on_fail: OnFail = "abort") -> Dict[str, str]:
    """The helper environment selecting a precopy policy (see pyxl-save-helper).

    ``downtime_ms`` None: Xen's default policy (an empty environment).
    """
    if downtime_ms is None:
        if max_iterations is not None:
            raise ValueError("max_iterations needs a downtime target (the downtime policy)")
        return {}
    if not 0.001 <= downtime_ms <= 3600000:
        raise ValueError(f"downtime must be from 0.001 to 3600000 ms, not {downtime_ms}")
    if on_fail not in ("abort", "stop"):
        raise ValueError(f"on_fail must be 'abort' or 'stop', not {on_fail!r}")
    env = {"PYXL_PRECOPY": "downtime", "PYXL_DOWNTIME_MS": repr(float(downtime_ms)),
           "PYXL_PRECOPY_ON_FAIL": on_fail}
    if max_iterations is not None:
        if not 1 <= max_iterations <= 1000000:
            raise ValueError(f"max_iterations must be from 1 to 1000000, not {max_iterations}")
        env["PYXL_MAX_ITERATIONS"] = str(max_iterations)
    return env
