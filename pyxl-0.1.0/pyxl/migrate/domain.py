"""What a migration does to the domain beyond its save and its restore.

This module owns xl's temporary names while two copies exist (the receiver's
``NAME--incoming`` until it is cleared to run, the sender's
``NAME--migratedaway`` from then until it is destroyed or renamed back), the
domain name in a saved libxl config, and the optional digest of a domain
(which never fails a migration: a failure to take it is logged).  It may
import logging and typing only; the backend comes in as an argument.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional

__all__ = ["AWAY", "INCOMING", "digest_or_none", "domain_name"]

INCOMING = "--incoming"      # xl's name suffixes while two copies exist
AWAY = "--migratedaway"


def digest_or_none(backend: Any, logger: logging.Logger, domid: int) -> Optional[str]:
    """``backend.digest(domid)``, or None (logged as a warning) if it fails."""
    try:
        digest: Optional[str] = backend.digest(domid)
        return digest
    except Exception as exc:  # a digest is an extra: report, go on
        logger.warning("no digest of domain %d: %s", domid, exc)
        return None


def domain_name(config: Optional[Dict[str, Any]]) -> Optional[str]:
    """``c_info.name`` of a libxl config, if it is a non-empty string."""
    c_info = config.get("c_info") if isinstance(config, dict) else None
    name = c_info.get("name") if isinstance(c_info, dict) else None
    return name if isinstance(name, str) and name else None
