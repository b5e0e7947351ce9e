"""A Ray cluster's address, checked before Ray is asked to join it: for `rlhf-ray scale
--address` and for a run's RAY_ADDRESS.

Ray's own connect retries a GCS that is not there for over a minute, and a malformed address
or the dashboard's http URL ends in a traceback. So the address is checked first: HOST:PORT
(not the URL), and a port that takes a TCP connection within seconds.
"""

from __future__ import annotations

import socket

from rlhf_ray.errors import UserInputError

CONNECT_TIMEOUT_S = 10  # a GCS that takes TCP connections answers Ray in a second or two
EXPECTED = (
    "expected the GCS address HOST:PORT of the cluster (`ray start --head` prints it, 6379 by "
    "default; a running job prints it when PPO starts)"
)


class NoRayCluster(UserInputError):
    """Nothing listens at the address, or its host is unknown or unreachable."""


def host_and_port(address: str, what: str, url_use: str) -> tuple[str, int]:
    """HOST:PORT -> (host, port); anything else (the dashboard's URL above all) is refused,
    naming `what` gave it (`--address`, `RAY_ADDRESS`) and, for the URL, `url_use`: how to
    use it instead."""
    if address.startswith(("http://", "https://")):
        raise UserInputError(
            f"{what} {address} is the dashboard's URL (what `ray job submit` uses); {url_use}: "
            f"{EXPECTED}"
        )
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UserInputError(f"{what} {address!r} is not HOST:PORT: {EXPECTED}")
    return host, int(port)


def check_gcs_reachable(host: str, port: int) -> None:
    """A TCP connection to the GCS port, in seconds, before Ray's minute of retries."""
    address = f"{host}:{port}"
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except socket.gaierror:
        raise NoRayCluster(f"no Ray cluster at {address!r}: unknown host; {EXPECTED}") from None
    except ConnectionRefusedError:
        reason = "connection refused (nothing listens on that port)"
        raise NoRayCluster(f"no Ray cluster at {address!r}: {reason}; {EXPECTED}") from None
    except OSError as err:  # unreachable network, or no answer within the timeout
        reason = err.strerror or "no answer"
        raise NoRayCluster(f"no Ray cluster at {address!r}: {reason}; {EXPECTED}") from None
