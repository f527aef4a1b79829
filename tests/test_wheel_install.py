"""The wheel alone, as an operator installs it: build it, install it into a fresh
virtualenv outside the source tree, and run the main job there.

Slow (a build and two installs from the package index, then `case-harness demo`, about
two minutes): marked ``wheel``; ``make test`` runs it, ``make test-fast`` does not. The
demo's backend is the scripted test fixture, as in ``make demo``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]

pytestmark = pytest.mark.wheel


def _run(argv: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    # No PYTHONPATH and a directory outside the source tree: only the installed wheel
    # can be imported.
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith(("CTO_HARNESS_", "CASE_"))}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def _ok(out: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert out.returncode == 0, f"{out.args}: exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def _clean_source(dest: Path) -> Path:
    """The tree's files as git sees them (tracked, or new and not ignored), without the
    build/ and *.egg-info/ that an earlier build left: setuptools copies stale files from
    there into a wheel, which would hide a file missing from the package data."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True, timeout=60).stdout.decode().split("\0")
    for name in filter(None, listed):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def test_demo_passes_from_the_wheel_in_a_fresh_virtualenv(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    source = _clean_source(tmp_path / "source")
    _ok(_run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(source)], tmp_path))
    [wheel] = list(dist.glob("case_local_route-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        meta = archive.read(f"case_local_route-{VERSION}.dist-info/METADATA").decode()
    assert {"harness/data/case-profile.example.toml", "harness/data/report.schema.json",
            f"case_local_route-{VERSION}.dist-info/licenses/LICENSE"} <= set(names)
    assert "License-Expression: Apache-2.0" in meta.splitlines()
    assert "Requires-Dist: openai>=1.30; extra == \"agent\"" in meta.splitlines()
    venv = tmp_path / "venv"
    _ok(_run([sys.executable, "-m", "venv", str(venv)], tmp_path))
    py, bin_dir = venv / "bin" / "python", venv / "bin"
    work = tmp_path / "work"
    work.mkdir()

    # The plain install: the proxy and the harness, without the agent's SDK.
    _ok(_run([str(py), "-m", "pip", "install", "-q", str(wheel)], work))
    where = _ok(_run([str(py), "-c", "import harness, proxy; print(harness.__file__); print(proxy.__file__)"], work))
    assert all(Path(line).is_relative_to(venv) for line in where.stdout.split()), where.stdout
    assert _run([str(py), "-c", "import openai"], work).returncode != 0, "openai must not come with a plain install"
    assert _ok(_run([str(bin_dir / "case-proxy"), "--version"], work)).stdout.startswith(f"case-proxy {VERSION} (")
    assert _ok(_run([str(bin_dir / "case-harness"), "--version"], work)).stdout.startswith(f"case-harness {VERSION} (")
    schema = json.loads(_ok(_run([str(bin_dir / "case-harness"), "schema"], work)).stdout)
    assert schema == json.loads((ROOT / "config" / "report.schema.json").read_text())
    no_agent = _run([str(bin_dir / "case-harness"), "demo", "--runs-dir", str(work / "runs")], work)
    assert no_agent.returncode == 2 and "case-local-route[agent]" in no_agent.stderr, no_agent.stderr
    assert "Traceback" not in no_agent.stderr and not (work / "runs").exists()

    # With the agent extra (still no test extra): the main job passes.
    _ok(_run([str(py), "-m", "pip", "install", "-q", f"{wheel}[agent]"], work))
    demo = _ok(_run([str(bin_dir / "case-harness"), "demo", "--runs-dir", str(work / "runs")], work))
    assert "demo OK" in demo.stdout
    reports = [json.loads(p.read_text()) for p in (work / "runs").glob("*/report.json")]
    assert [r["status"] for r in reports].count("pass") == 1, [r["status"] for r in reports]

    # pytest gone (the reference agent runs the visible tests with it): a clear error before
    # any run starts, not a run whose agent cannot test its work.
    _ok(_run([str(py), "-m", "pip", "uninstall", "-q", "-y", "pytest"], work))
    no_runner = _run([str(bin_dir / "case-harness"), "demo", "--runs-dir", str(work / "runs2")], work)
    assert no_runner.returncode == 2 and "needs the 'pytest' package" in no_runner.stderr, no_runner.stderr
    assert not (work / "runs2").exists()
