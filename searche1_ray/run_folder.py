"""Where a run's folder is: ``run.output_dir`` made absolute by one rule, and finding a run by name.

    absolute or ~ path              → as given
    relative, in a normal directory → against the current directory (``runs`` → ./runs)
    relative, inside a Ray job      → under ~/searche1-ray (``runs`` → ~/searche1-ray/runs)

A job started with ``ray job submit --working-dir .`` runs in Ray's unpacked copy of the working
dir (``…/runtime_resources/working_dir_files/_ray_pkg_<hash>/``), which Ray deletes with its
session; the directory the user submitted from is not knowable there. So a relative output dir of
a process whose current directory lies inside a ``_ray_pkg_…`` folder resolves under the home
directory of the node it runs on, which outlives the job. On a multi-node cluster, make
``run.output_dir`` an absolute path on shared storage instead.
"""

from __future__ import annotations

import os
from pathlib import Path

RAY_JOB_HOME = Path("~/searche1-ray")  # where a Ray job's relative run.output_dir lands
RAY_PACKAGE_PREFIX = "_ray_pkg_"       # Ray's unpacked working_dir / py_modules folders


def in_ray_package(cwd: str | os.PathLike) -> bool:
    """Whether ``cwd`` lies inside a Ray runtime-env package folder (deleted with the session)."""
    return any(part.startswith(RAY_PACKAGE_PREFIX) for part in Path(cwd).parts)


def resolve_output_dir(output_dir: str | os.PathLike, cwd: str | os.PathLike | None = None) -> Path:
    """``run.output_dir`` as an absolute folder by the rule in the module docstring."""
    p = Path(output_dir).expanduser()
    if p.is_absolute():
        return Path(os.path.normpath(p))
    here = Path(cwd) if cwd is not None else Path.cwd()
    base = RAY_JOB_HOME.expanduser() if in_ray_package(here) else here
    return Path(os.path.normpath(base / p))


def find_run_dir(run: str | os.PathLike, output_dir: str | os.PathLike, marker: str,
                 cwd: str | os.PathLike | None = None) -> Path:
    """The folder of run ``run`` — a run folder, or a name under ``output_dir`` — that holds
    ``marker`` (``state.json``, ``config.yaml``). A name is looked up where this process puts
    runs (``resolve_output_dir``), then, for a relative ``output_dir``, where a Ray job puts them,
    so ``jobs.status NAME`` from a checkout finds a run a ``ray job submit`` wrote. Raises
    ``FileNotFoundError`` naming every folder tried."""
    here = Path(cwd) if cwd is not None else Path.cwd()
    given = Path(run).expanduser()
    tried = [given if given.is_absolute() else here / given]
    if len(given.parts) == 1:  # a name
        tried.append(resolve_output_dir(output_dir, here) / given)
        if not Path(output_dir).expanduser().is_absolute():
            tried.append(Path(os.path.normpath(RAY_JOB_HOME.expanduser() / output_dir / given)))
    for folder in dict.fromkeys(tried):
        if (folder / marker).is_file():
            return folder
    raise FileNotFoundError(f"run '{run}': no {marker} in " + " or ".join(str(f) for f in dict.fromkeys(tried)))
