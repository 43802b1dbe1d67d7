"""``kvorch submit --detach``: hand the same submission to a cluster through the Ray Jobs API.

The job's entrypoint is this very command line (the options the user gave, rebuilt from the
Click context) run on the cluster's head node with ``--address auto``, under a run id fixed
here so the caller can follow it with ``kvorch status``. The lake must be one the cluster can
reach (a shared path or an ``s3://``/``gs://`` URI).
"""

from __future__ import annotations

import shlex
from urllib.parse import urlparse

import click

from orchestrator.errors import KvorchError

DASHBOARD_PORT = 8265
# Options the detached command sets itself.
_REPLACED = ("detach", "address", "run_id", "resume", "progress", "lake")


def entrypoint(ctx: click.Context, lake: str, run_id: str) -> str:
    """``kvorch submit ...`` with every option the user set explicitly, for the cluster to run."""
    args = ["kvorch", "submit"]
    for param in ctx.command.params:
        if param.name in _REPLACED or ctx.get_parameter_source(param.name) is click.core.ParameterSource.DEFAULT:
            continue
        value = ctx.params[param.name]
        flag = param.opts[0]
        if getattr(param, "is_flag", False) and param.secondary_opts:
            args.append(param.opts[0] if value else param.secondary_opts[0])
        elif getattr(param, "multiple", False):
            for item in value:
                args += [flag, str(item)]
        elif value is not None:
            args += [flag, str(value)]
    args += ["--lake", lake, "--address", "auto", "--run-id", run_id, "--no-progress"]
    return shlex.join(args)


def jobs_address(address: str | None) -> str | None:
    """The Jobs API (dashboard) address: ``ray://host:10001`` -> ``http://host:8265``.

    ``None``/``auto`` lets Ray find it (``RAY_ADDRESS`` or the local cluster).
    """
    if not address or address == "auto":
        return None
    if address.startswith(("http://", "https://")):
        return address
    if address.startswith("ray://"):
        return f"http://{urlparse(address).hostname}:{DASHBOARD_PORT}"
    return f"http://{address.rsplit(':', 1)[0]}:{DASHBOARD_PORT}"


def submit_job(address: str | None, command: str, submission_id: str) -> str:
    """Submit ``command`` as a Ray job and return its id."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(jobs_address(address)).submit_job(entrypoint=command, submission_id=submission_id)
    except AuthenticationError:
        raise KvorchError(
            "the Ray Jobs API wants the cluster's auth token; set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN "
            "(or ~/.ray/auth_token) as for `ray job submit`"
        ) from None
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise KvorchError(
            f"cannot submit to the Ray Jobs API ({str(exc).splitlines()[0]}); pass --address ray://HEAD:10001 or "
            "http://HEAD:8265, or set RAY_ADDRESS"
        ) from None
