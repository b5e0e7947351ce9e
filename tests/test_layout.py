"""The layout keeps its promises: the library never reaches into the driver or the actors, no
module imports in a circle, and the presets ship inside the package."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("rlhf_ray", "jobs", "actors")


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the three top-level packages."""
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def imported_modules(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules `path` imports anywhere in the file (function-level imports included).

    `from a.b import c` is an edge to `a.b.c` when that is a module, else to `a.b`.
    """
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                for a in node.names
            ]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one_and_only_when_there_is_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_module_of_the_project_imports_in_a_circle():
    modules = project_modules()
    graph = {name: imported_modules(path, modules) - {name} for name, path in modules.items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_library_source_never_names_jobs_or_actors():
    modules = project_modules()
    for name, path in modules.items():
        if name.startswith("rlhf_ray"):
            bad = {m for m in imported_modules(path, modules) if m.split(".")[0] != "rlhf_ray"}
            assert not bad, f"{name} imports {bad}"


def _assert_imports_load_none_of(modules: list[str], packages: tuple[str, ...]) -> None:
    """Import `modules` in a fresh Python; none of `packages` (dotted names: a package or a
    module, with their submodules) may load."""
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"loaded = sorted(m for m in sys.modules\n"
        f"    if any(m == p or m.startswith(p + '.') for p in {packages!r}))\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_importing_every_library_module_loads_nothing_from_jobs_or_actors():
    library = sorted(name for name in project_modules() if name.startswith("rlhf_ray"))
    _assert_imports_load_none_of(library, ("jobs", "actors"))


def test_roles_that_build_no_adapter_do_not_import_peft():
    """peft imports bitsandbytes, which imports torch's compiler: ~2 s of CPU in every process
    that imports it. The reference model, the reward scorer and evaluation never need it."""
    frozen = ["actors.reference_model", "actors.reward_scorer", "rlhf_ray.run.evaluation"]
    _assert_imports_load_none_of(frozen, ("peft", "bitsandbytes"))


def test_the_driver_imports_no_model_code():
    """The driver creates the roles and hands Ray Train its loops, and never loads a model:
    without peft, bitsandbytes, transformers' modeling code, datasets and Ray Train it starts
    in ~4 s of CPU instead of ~8.5 s (measured). Roles import their cores in their own
    processes (actors/), the workers' settings live in light modules (ppo/settings.py,
    train/settings.py), and `datasets` loads only where user rows are read."""
    heavy = ("peft", "bitsandbytes", "transformers.modeling_utils", "datasets", "ray.train")
    _assert_imports_load_none_of(["jobs.rlhf", "jobs.scale"], heavy)


def test_what_ray_train_unpickles_in_its_controller_imports_no_model_library():
    """The loop entry points and worker settings the driver hands Ray Train are unpickled in its
    controller too, which never trains: importing torch, transformers and peft there cost ~7 s
    of CPU per phase before any worker started (measured)."""
    handed = ["rlhf_ray.train.launch", "rlhf_ray.train.settings"]
    _assert_imports_load_none_of(handed, ("torch", "transformers", "peft", "datasets"))


def test_presets_are_package_data_found_from_any_directory(tmp_path):
    code = (
        "from rlhf_ray.config.loading import load_config, preset_names\n"
        "assert preset_names() == ['default', 'mistral-7b-qlora', 'smoke'], preset_names()\n"
        "assert load_config('smoke').ppo.steps == 2\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_cluster_yaml_starts_every_node_with_token_auth_and_a_local_dashboard():
    import yaml

    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    starts = cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]
    ray_starts = [c for c in starts if "ray start" in c]
    assert len(ray_starts) == 2
    assert all(c.startswith("RAY_AUTH_MODE=token ray start") for c in ray_starts)
    assert "--dashboard-host=127.0.0.1" in cluster["head_start_ray_commands"][-1]
    # The same token on every node: the one `ray get-auth-token --generate` wrote locally.
    assert cluster["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_cluster_yaml_passes_rays_own_check():
    """What `ray up` does first: fill in the provider's defaults, then validate against Ray's
    cluster schema (a misspelt key or a bad node type fails here, not on a user's cloud)."""
    import copy

    import jsonschema
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    assert prepared["available_node_types"]["gpu_worker"]["min_workers"] == 3
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_worker"]["min_wokers"] = 3
    with pytest.raises(jsonschema.ValidationError, match="min_wokers"):
        validate_config(prepare_config(broken))


def strict(schema):
    """A Kubernetes structural schema as the API server applies it with strict field validation
    (kubectl's default): an object that lists its properties takes no others, unless it is
    marked to keep unknown fields or says what other properties may hold."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    keeps = out.get("x-kubernetes-preserve-unknown-fields") or "additionalProperties" in out
    if "properties" in out and not keeps:
        out["additionalProperties"] = False
    return out


def test_rayjob_manifest_is_a_valid_kuberay_rayjob():
    """Against KubeRay's own RayJob schema (tests/data/README.md says where it is from), with
    unknown fields refused as `kubectl apply` refuses them."""
    import copy
    import gzip
    import json

    import jsonschema
    import yaml

    with gzip.open(ROOT / "tests" / "data" / "kuberay-rayjob-v1.schema.json.gz") as f:
        schema = strict(json.load(f))
    rayjob = next(yaml.safe_load_all((ROOT / "rayjob.yaml").read_text()))
    assert rayjob["apiVersion"] == "ray.io/v1"
    jsonschema.validate(rayjob, schema)
    broken = copy.deepcopy(rayjob)
    broken["spec"]["rayClusterSpec"]["headGroupSpec"]["serviceTipe"] = "ClusterIP"
    with pytest.raises(jsonschema.ValidationError, match="serviceTipe"):
        jsonschema.validate(broken, schema)


def test_rayjob_manifest_has_token_auth_and_keeps_the_dashboard_inside():
    import yaml

    rayjob, policy = yaml.safe_load_all((ROOT / "rayjob.yaml").read_text())
    cluster = rayjob["spec"]["rayClusterSpec"]
    assert rayjob["kind"] == "RayJob" and cluster["authOptions"] == {"mode": "token"}
    assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert "enableIngress" not in cluster["headGroupSpec"]
    assert policy["kind"] == "NetworkPolicy" and policy["spec"]["policyTypes"] == ["Ingress"]
    assert "jobs/rlhf.py" in rayjob["spec"]["entrypoint"]


def test_runtime_envs_install_what_pyproject_asks_for():
    """Nodes without the project get pyproject's dependencies (less ray, which they run)."""
    import yaml

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # requires-python is 3.10: the dev extra brings tomli, what became tomllib
        import tomli as tomllib

    wanted = [
        d.split("#")[0].strip()
        for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
        if not d.startswith("ray")
    ]
    wanted = ["torch==2.13.0" if d.startswith("torch") else d for d in wanted]
    job_env = yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text())
    assert job_env["pip"]["packages"] == wanted
    rayjob = next(yaml.safe_load_all((ROOT / "rayjob.yaml").read_text()))
    manifest_env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    assert manifest_env["pip"] == job_env["pip"] and manifest_env["env_vars"] == job_env["env_vars"]
