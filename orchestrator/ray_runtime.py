"""Ray start-up for the drivers: join a cluster or start a local Ray, and the driver resource.

``mode-cl run`` and ``mode-cl sweep``/``resume`` call :func:`init_ray` once, before their first
Ray call; on a ``ray up`` cluster the driver runs on the head and joins with ``--address auto``.
"""

from __future__ import annotations

import os
from pathlib import Path

# Sweep trial drivers reserve a sliver of this custom resource instead of CPU: a fractional CPU per
# driver leaves e.g. 0.98 of the second core free, so a second 1-CPU Train worker never fits.
# cluster.yaml gives the head node TRAIN_DRIVER, which also keeps drivers off preemptible workers.
DRIVER_RESOURCE = "TRAIN_DRIVER"


def init_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Join ``address`` or start a local Ray with the dashboard bound to 127.0.0.1 (the dashboard
    process is what frees the placement groups of stopped trials)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if address:
        _token_auth_for_explicit_address(address)
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(
            num_cpus=num_cpus,
            resources={DRIVER_RESOURCE: 1.0},
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            log_to_driver=True,
        )


def _token_auth_for_explicit_address(address: str) -> None:
    """Ray sends its auth token only when it finds the cluster itself (``auto``); given an explicit
    ``HOST:PORT`` it connects without one unless RAY_AUTH_MODE=token, and a token-protected cluster
    (Ray's default) then answers "Authentication token is missing" for 20 s. With a token available
    (``~/.ray/auth_token``, RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH) we present it, as ``auto`` would."""
    if address == "auto" or "RAY_AUTH_MODE" in os.environ:
        return
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if os.environ.get("RAY_AUTH_TOKEN") or token_file.is_file():
        os.environ["RAY_AUTH_MODE"] = "token"
        try:  # Ray caches its config at import: refresh it, as Ray's own `auto` path does
            from ray._private.authentication.authentication_token_setup import _enable_token_auth
        except ImportError:
            return
        _enable_token_auth()
