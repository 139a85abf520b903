"""environment.yml, pyproject.toml, README and .ci/run agree with each other."""

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _normalise(req: str) -> str:
    return re.sub(r"\s+", "", req).lower().replace("_", "-")


def _name(req: str) -> str:
    return _normalise(re.split(r"[<>=!~\[ ]", req.strip())[0])


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _expand(reqs: list[str], extras: dict) -> list[str]:
    """Requirements with the project's own extras (dymu_viz[a,b]) replaced by theirs."""
    out = []
    for req in reqs:
        own = re.fullmatch(r"dymu_viz\[(.*)\]", req)
        out += _expand([r for e in own.group(1).split(",") for r in extras[e]], extras) if own else [req]
    return out


def _pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return {_name(line): line.strip() for line in lines if line.strip() and not line.startswith("#")}


def test_environment_yml_is_the_tested_set():
    """environment.yml lists the runtime and dev requirements once each: constraints.txt's exact
    release where it pins one (and that release lies in pyproject's range), pyproject's
    requirement otherwise."""
    from packaging.requirements import Requirement

    project, pins = _project(), _pins()
    wanted = {}
    for req in project["dependencies"] + _expand(project["optional-dependencies"]["dev"],
                                                 project["optional-dependencies"]):
        name = _name(req)
        if name in pins:
            assert Requirement(req).specifier.contains(pins[name].split("==")[1]), (req, pins[name])
        wanted.setdefault(name, _normalise(pins.get(name, req)))
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    assert "python=3.11" in deps
    pip_section = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
    listed = [_normalise(r) for r in pip_section if not r.startswith("-e")]
    assert sorted(listed) == sorted(wanted.values())
    assert set(pins) <= set(wanted) | {"torch-scatter"}  # nothing pinned that nothing asks for


def test_ranges_start_at_the_floor_and_the_readme_installs_the_tested_set():
    """pyproject's torch and transformers ranges start at versions.MINIMUM, which the floor leg of
    .ci/run installs; the README's install commands all use constraints.txt."""
    from dymu_viz.versions import MINIMUM

    deps = {_name(r): r for r in _project()["dependencies"]}
    for package, minimum in MINIMUM.items():
        assert f">={minimum}," in deps[package]
    ci = (ROOT / ".ci" / "run").read_text()
    floor = re.search(r'^floor="(.*)"$', ci, re.M).group(1).split()
    assert {p.split("==")[0]: p.split("==")[1] for p in floor if not p.startswith("torchvision")} == \
        {p: f"{m}.0" for p, m in MINIMUM.items()}
    installs = [line for line in (ROOT / "README.md").read_text().splitlines() if "pip install -q" in line
                and line.startswith("python3 -m venv .venv")]
    assert installs and all(line.count("pip install") == line.count("-c constraints.txt") for line in installs)


def test_the_floor_leg_runs_every_file_with_floor_tests():
    ci = (ROOT / ".ci" / "run").read_text()
    command = ci[ci.index(".venv-floor/bin/python -m pytest"):]
    named = set(re.findall(r"tests/\S+\.py", command))
    marked = {f"tests/{p.name}" for p in (ROOT / "tests").glob("test_*.py") if "pytest.mark.floor" in p.read_text()}
    assert named == marked


def test_ci_runs_the_readme_commands():
    readme = (ROOT / "README.md").read_text().splitlines()
    main = [line for line in readme if line.startswith("python3 -m venv .venv") and "dymu_viz demo" in line]
    tests = [line for line in readme if line.startswith("python3 -m venv .venv") and "pytest" in line]
    assert len(main) == 1 and len(tests) == 1
    ci = (ROOT / ".ci" / "run").read_text()
    assert "dymu_viz demo" in ci and "pytest" in ci and "README.md" in ci


@pytest.mark.floor
def test_a_release_below_the_floor_fails_the_import_by_name(tmp_path):
    """``import dymu_viz`` with a transformers or torch older than MINIMUM raises an ImportError
    that names the minimum (a fake distribution record first on the path stands in for the old
    release); the supported releases and local builds pass."""
    from dymu_viz.versions import MINIMUM, check_minimums, release

    assert release("2.11.0+cu130") == (2, 11, 0) and release("5.19.0.dev0") == (5, 19, 0)
    check_minimums({"torch": "2.11.0+cpu", "transformers": "5.19.0"})
    check_minimums({"torch": "2.14.1", "transformers": None})  # not installed: nothing to compare
    with pytest.raises(ImportError, match=r"needs torch>=2\.11 \(found 2\.10\.1\) and transformers>=5\.19 "
                                          r"\(found 5\.18\.0\); upgrade with pip install 'torch>=2\.11' "
                                          r"'transformers>=5\.19'"):
        check_minimums({"torch": "2.10.1", "transformers": "5.18.0"})
    record = tmp_path / "transformers-5.18.0.dist-info"
    record.mkdir()
    (record / "METADATA").write_text("Metadata-Version: 2.1\nName: transformers\nVersion: 5.18.0\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    done = subprocess.run([sys.executable, "-c", "import dymu_viz"], capture_output=True, text=True, env=env)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "ImportError: dymu_viz needs transformers>=5.19 (found 5.18.0); upgrade with pip install 'transformers>=5.19'")
    assert MINIMUM == {"torch": "2.11", "transformers": "5.19"}
