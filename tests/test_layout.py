"""The house rules of src/bincounter, read from the source: wings over a kernel, dependencies one way,
no import cycles, no module over 500 lines, and each knob declared once (MLproject, params.yaml, the
CLI and SageMaker's hyperparameters are derived from the config dataclasses)."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "bincounter"
WINGS = ("data", "training", "serving", "aws")
# what each part may import besides the kernel (cli may import every wing)
ALLOWED = {"kernel": set(), "data": set(), "serving": set(), "training": {"data", "serving"},
           "aws": {"data", "serving", "training"}, "cli": set(WINGS)}
# deprecated import paths kept for models logged before the split into wings
SHIMS = {"bincounter.pyfunc"}
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in WINGS:
        return parts[1]
    return "cli" if module in ("bincounter.cli", "bincounter.__main__") else "kernel"


def imports_of(path: Path) -> set[str]:
    """Every bincounter module path imports, at the top or inside functions."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}  # `from pkg import module`
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    return {name for name in found if name in modules and name != module_name(path)}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def test_the_wings_exist_with_their_public_names():
    for wing in WINGS:
        init = PACKAGE / wing / "__init__.py"
        assert init.exists(), f"{wing}/ is not a package"
        tree = ast.parse(init.read_text())
        assert ast.get_docstring(tree), f"{wing}/__init__.py says nothing about the wing"
    import importlib

    import types

    for wing in WINGS:
        module = importlib.import_module(f"bincounter.{wing}")
        for name in module.__all__:
            value = getattr(module, name)
            assert callable(value) or isinstance(value, types.ModuleType), f"bincounter.{wing}.{name} is missing"


def test_dependencies_point_one_way():
    wrong = []
    for module, targets in graph().items():
        if module in SHIMS:
            continue
        source = part_of(module)
        for target in targets:
            kind = part_of(target)
            if kind != "kernel" and kind != source and kind not in ALLOWED[source]:
                wrong.append(f"{module} -> {target}")
            if source == "kernel" and kind == "cli":
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports against the wings' direction:\n" + "\n".join(sorted(wrong))


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_cycles():
    # a package's __init__ is imported with each of its modules; its lazy names import nothing
    edges = {m: {t for t in ts if not (PACKAGE.parent / t.replace(".", "/") / "__init__.py").exists()}
             for m, ts in graph().items()}
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_every_wing_and_the_kernel_import_in_a_fresh_interpreter():
    import subprocess
    import sys

    code = "import importlib, pkgutil, bincounter\n" \
           "for m in pkgutil.walk_packages(bincounter.__path__, 'bincounter.'):\n" \
           "    if not m.name.endswith(('__main__', 'aws.entry')): importlib.import_module(m.name)\n"
    result = subprocess.run([sys.executable, "-W", "error::ImportWarning", "-c", code], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


# ------------------------------------------------------------------ each knob declared once


def test_mlproject_is_derived_from_the_declared_knobs():
    from bincounter.cli import render_mlproject

    assert (ROOT / "MLproject").read_text() == render_mlproject(), \
        "MLproject is out of date: run `bincounter mlproject > MLproject`"
    entry = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]["main"]
    from bincounter.config import TrainConfig

    assert {f.name for f in dataclasses.fields(TrainConfig)} <= set(entry["parameters"])


def test_params_yaml_declares_every_knob_with_its_default():
    from bincounter.config import Config

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    defaults = Config().to_dict()
    assert set(params) == set(defaults)
    for section, values in defaults.items():
        assert set(params[section]) == set(values), f"params.yaml [{section}] and config.py disagree"
        for key, value in values.items():
            assert params[section][key] == value, f"{section}.{key}: params.yaml {params[section][key]!r}, " \
                                                  f"config.py {value!r}"


def test_cli_flags_and_sagemaker_hyperparameters_cover_every_training_knob():
    from bincounter.cli import build_parser
    from bincounter.config import TrainConfig, hyperparameter_keys

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    flags = {option for action in train._actions for option in action.option_strings}
    for spec in dataclasses.fields(TrainConfig):
        assert f"--{spec.name.replace('_', '-')}" in flags and f"--{spec.name}" in flags  # SageMaker's spelling
        assert (spec.name in hyperparameter_keys()) == spec.metadata["remote"]
    assert hyperparameter_keys()["emd_weight"] == "train.emd_weight"
    assert hyperparameter_keys()["max_count"] == "data.max_count"


@pytest.mark.parametrize("key, value, message", [
    ("train.epochs", "0", "train.epochs must be at least 1"),
    ("train.batch_size", "-4", "train.batch_size must be at least 1"),
    ("train.lr", "nan", "train.lr: expected a finite number"),
    ("train.lr", "-0.1", "train.lr must be at least 0"),
    ("train.image_size", "0", "train.image_size must be at least 16"),
    ("train.device", "tpu", "train.device must be auto, cpu or cuda"),
    ("split.fractions", "[1.0, 0.0, 0.0]", "split.fractions must be three positive numbers"),
    ("train.epochs", "2.5", "expected a whole number"),
])
def test_out_of_range_knobs_are_refused_in_one_line(key, value, message):
    from bincounter.config import build_config
    from bincounter.errors import BincounterError

    with pytest.raises(BincounterError, match=message.replace("[", r"\[")):
        build_config({}, {key: value})


def test_a_named_params_file_must_exist(tmp_path, monkeypatch, capsys):
    from bincounter.cli import main

    assert main(["split", "--params", str(tmp_path / "missing.yaml")]) == 1
    assert capsys.readouterr().err.strip() == f"error: params file {tmp_path / 'missing.yaml'} not found"
    monkeypatch.setenv("BINCOUNTER_PARAMS", str(tmp_path / "also-missing.yaml"))
    assert main(["split"]) == 1
    assert "also-missing.yaml not found" in capsys.readouterr().err
