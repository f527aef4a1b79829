"""Packaging without building a wheel: package data is the one source of truth, the
proxy does not need ``openai``, both CLIs say their version, the build is a metric, and a
run that lacks its acceptance runner or its agent's SDK stops with a clear error."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tomllib
from collections.abc import Callable
from importlib import metadata
from importlib.machinery import ModuleSpec
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import harness
from harness import cli as harness_cli
from harness.demo import demo_profile
from harness.fixture_catalog import load_fixture
from harness.profile import REFERENCE_PROFILE_PATH
from harness.report import PACKAGED_SCHEMA, SCHEMA_PATH, packaged_schema_text, report_schema, write_schema
from harness.run import RunConfigError, run_once
from harness.runtime_check import python_module, run_problems
from proxy.admission import load_admission
from proxy.build_info import UNKNOWN_VERSION, build_labels, version
from proxy.metrics import ProxyMetrics
from tests.harness_support import reference_profile
from tests.proxy_support import write_artifacts

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_packaged_profile_and_schema_are_the_config_copies() -> None:
    """config/ keeps copies for readers; the package's files are what runs. They must not
    drift: `python -m harness.report --schema` rewrites both schema files, and a profile
    edit goes to harness/data/ and is copied to config/."""
    assert Path(str(REFERENCE_PROFILE_PATH)).is_relative_to(Path(harness.__file__).parent)
    assert REFERENCE_PROFILE_PATH.read_bytes() == (ROOT / "config" / "case-profile.example.toml").read_bytes(), \
        "harness/data/case-profile.example.toml and config/case-profile.example.toml differ: copy one over the other"
    assert PACKAGED_SCHEMA.read_bytes() == SCHEMA_PATH.read_bytes(), \
        "harness/data/report.schema.json and config/report.schema.json differ: run `python -m harness.report --schema`"
    assert json.loads(packaged_schema_text()) == report_schema()


def test_write_schema_writes_every_copy(tmp_path: Path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert write_schema((a, b)) == [a, b]
    assert json.loads(a.read_text()) == report_schema() and a.read_bytes() == b.read_bytes()


def test_package_data_is_declared_for_the_wheel() -> None:
    data = PYPROJECT["tool"]["setuptools"]["package-data"]["harness"]
    assert "data/*" in data
    assert {p.name for p in (Path(harness.__file__).parent / "data").iterdir()} >= {
        "case-profile.example.toml", "report.schema.json"}


def test_dependencies_extras_and_metadata() -> None:
    project = PYPROJECT["project"]
    deps = " ".join(project["dependencies"])
    assert "openai" not in deps, "the proxy does not need openai: it belongs to the agent extra"
    assert "pytest" in deps, "the harness runs acceptance tests with pytest at run time"
    extras = project["optional-dependencies"]
    assert any(d.startswith("openai") for d in extras["agent"])
    assert {"agent", "engine", "test"} <= set(extras)
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    assert "Programming Language :: Python :: 3.11" in project["classifiers"]
    assert "Apache License" in (ROOT / "LICENSE").read_text() and "Version 2.0" in (ROOT / "LICENSE").read_text()
    assert f"## [{project['version']}]" in (ROOT / "CHANGELOG.md").read_text()


def test_the_proxy_imports_and_serves_without_openai(tmp_path: Path) -> None:
    """Every proxy module imports, and a proxy app is built, with `openai` made
    unimportable: an install without the agent extra runs the proxy."""
    code = (
        "import sys, pkgutil, importlib\n"
        "sys.modules['openai'] = None\n"  # any `import openai` now raises ImportError
        "import proxy\n"
        "for m in pkgutil.iter_modules(proxy.__path__):\n"
        "    if m.name == '__main__': continue\n"
        "    importlib.import_module('proxy.' + m.name)\n"
        "from proxy.cli import main\n"
        "sys.exit(main(['check-config']))\n"
    )
    d, a = write_artifacts(tmp_path)
    env = {"PATH": "/usr/bin:/bin", "CTO_HARNESS_CASE_DECISION_FILE": str(d),
           "CTO_HARNESS_CASE_MODEL_ADMISSION_FILE": str(a),
           "CTO_HARNESS_CASE_LOCAL_BASE_URL": "http://127.0.0.1:9/v1", "CASE_PROXY_TOKEN": "t" * 32,
           "CASE_PROXY_EVIDENCE_FILE": str(tmp_path / "e.jsonl")}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "configuration valid" in out.stdout


@pytest.mark.parametrize("prog", ["proxy", "harness"])
def test_version_flag(prog: str) -> None:
    out = subprocess.run([sys.executable, "-m", prog, "--version"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    name = {"proxy": "case-proxy", "harness": "case-harness"}[prog]
    assert out.stdout.startswith(f"{name} {metadata.version('case-local-route')} (")


def test_version_comes_from_the_installed_metadata() -> None:
    assert version() == metadata.version("case-local-route") != UNKNOWN_VERSION
    assert build_labels()["version"] == version()


def test_build_info_and_process_metrics_on_the_proxy_registry(tmp_path: Path) -> None:
    _, a = write_artifacts(tmp_path)
    text = ProxyMetrics(load_admission(a)).render().decode()
    samples = {s.name: s for f in text_string_to_metric_families(text) for s in f.samples}
    build = samples["case_proxy_build_info"]
    assert build.value == 1 and build.labels["version"] == version()
    assert set(build.labels) == {"version", "python_version", "python_implementation"}
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds",
                 "process_start_time_seconds"):
        assert samples[name].value > 0, name


def test_build_info_with_several_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Multiprocess mode (several workers) renders only what the shared files hold: the
    build must be among them."""
    from prometheus_client import values

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setattr(values, "ValueClass", values.get_value_class())
    _, a = write_artifacts(tmp_path)
    text = ProxyMetrics(load_admission(a), multiprocess_dir=tmp_path).render().decode()
    samples = {s.name: s for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples["case_proxy_build_info"].labels["version"] == version()


# ----------------------------------------------------------------- missing run-time packages

_REAL_FIND_SPEC = importlib.util.find_spec


def _missing(*names: str) -> Callable[[str], ModuleSpec | None]:
    """``find_spec`` as in an environment where ``names`` are not installed."""
    def find_spec(name: str) -> ModuleSpec | None:
        return None if name in names else _REAL_FIND_SPEC(name)
    return find_spec


def test_python_module_of_an_argv() -> None:
    assert python_module(["python", "-m", "pytest", "-q"]) == "pytest"
    assert python_module([sys.executable, "-m", "harness.reference_agent"]) == "harness.reference_agent"
    assert python_module(["/usr/bin/case", "-m", "x"]) is None
    assert python_module(["python", "script.py"]) is None


def test_run_problems_name_the_missing_package_and_the_fix() -> None:
    fixture = load_fixture("r1-string-slugify")
    acceptance, case = fixture.spec.acceptance_test_command, demo_profile().case.command
    assert run_problems(acceptance, case) == []
    # The acceptance cases run in the harness's own worker: pytest is not needed for them,
    # only for the reference agent's run_tests tool (the fixture's visible tests).
    [agent] = run_problems(acceptance, case, _missing("pytest"))
    assert "harness.reference_agent" in agent and "'pytest'" in agent and "pip install pytest" in agent
    assert run_problems(acceptance, ["/opt/case/bin/case"], _missing("pytest")) == []
    [runner] = run_problems(acceptance, case, _missing("harness.acceptance_worker"))
    assert "acceptance test runner 'harness.acceptance_worker' is not installed" in runner
    assert "reinstall the package" in runner
    [runner] = run_problems(["python", "-m", "pytest", "t"], ["/opt/case/bin/case"], _missing("pytest"))
    assert "acceptance test runner 'pytest' is not installed" in runner and "pip install pytest" in runner
    [agent] = run_problems(acceptance, case, _missing("openai"))
    assert "harness.reference_agent" in agent and "case-local-route[agent]" in agent
    assert len(run_problems(acceptance, case, _missing("harness.acceptance_worker", "openai"))) == 2
    # A Case that is an external program is not this interpreter's business.
    assert run_problems(acceptance, ["/opt/case/bin/case", "--task", "{task_file}"], _missing("openai")) == []


def test_a_run_without_its_acceptance_runner_stops_before_it_starts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hostile environment: the acceptance worker is not importable. The run must not start (no run
    directory, so no Case process) and must say why, instead of ending 'fail' with
    '0 failed, 0 errors of 0'."""
    monkeypatch.setattr(importlib.util, "find_spec", _missing("harness.acceptance_worker"))
    runs = tmp_path / "runs"
    with pytest.raises(RunConfigError, match="acceptance test runner 'harness.acceptance_worker' is not installed"):
        run_once(reference_profile(), {"PATH": "/usr/bin:/bin"}, runs, backend="scripted")
    assert not runs.exists() or not any(runs.iterdir())


@pytest.mark.parametrize("argv,missing", [(["run", "--backend", "scripted"], "harness.acceptance_worker"),
                                          (["demo"], "openai")])
def test_cli_exits_2_naming_the_missing_package(argv: list[str], missing: str, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", _missing(missing))
    runs = tmp_path / "runs"
    code = harness_cli.main([*argv, "--runs-dir", str(runs)], env={"PATH": "/usr/bin:/bin"})
    err = capsys.readouterr().err
    assert code == 2 and f"'{missing}'" in err, err
    assert not runs.exists() or not any(runs.iterdir())


def test_preflight_exits_2_naming_a_missing_runner(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A preflight must not say 'ok' for a run that would stop on a missing package."""
    monkeypatch.setattr(importlib.util, "find_spec", _missing("harness.acceptance_worker"))
    code = harness_cli.main(["preflight"], env={"PATH": "/usr/bin:/bin"})
    out = capsys.readouterr()
    assert code == 2 and "'harness.acceptance_worker' is not installed" in out.err, out
