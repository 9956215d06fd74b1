"""Install Debian packages a launch test needs, or skip the test where that is impossible."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

SBIN = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def which(name: str) -> str | None:
    """shutil.which, also looking in the sbin directories a non-login PATH may lack."""
    return shutil.which(name) or shutil.which(name, path=SBIN)


def require(packages: list[str], programs: list[str]) -> None:
    """apt-get install `packages` unless every one of `programs` is present; skip if impossible."""
    if all(which(p) for p in programs):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(
            f"{', '.join(programs)} missing and not installable here (needs root and "
            f"apt-get): apt-get install {' '.join(packages)}"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    r = subprocess.run(install, env=env, capture_output=True, text=True)
    if r.returncode != 0:  # a fresh machine has no package lists yet
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        r = subprocess.run(install, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"apt-get install {' '.join(packages)} failed:\n{r.stdout[-1500:]}{r.stderr[-1500:]}")
    missing = [p for p in programs if not which(p)]
    if missing:
        pytest.skip(f"installed {' '.join(packages)} but {missing} are still missing")
