"""The shape of the code: imports flow one way, each default is declared once, the CLI is
built from the stage configs, configs hold their own bounds, and the docs describe the files
that exist."""

import ast
import dataclasses
import glob
import os
import re

import pytest

from covidray.cli import BY_NAME, STAGES, build_parser, parse
from covidray.config import cli_fields
from covidray.stages.train import PRESETS, TrainConfig

from conftest import REPO

PACKAGE = os.path.join(REPO, "covidray")


def module_files() -> dict[str, str]:
    """``covidray.x.y`` -> its path, for every module of the package."""
    found = {}
    for path in glob.glob(os.path.join(PACKAGE, "**", "*.py"), recursive=True):
        relative = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
        found[relative.removesuffix(".__init__")] = path
    return found


def imports_of(path: str) -> set[str]:
    """The covidray modules a file imports, at any depth of its code (lazy imports too)."""
    names = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: {m for m in imports_of(path) if m in modules and m != name}
            for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path + [node, nxt]
            if nxt not in state:
                found = visit(nxt, path + [node])
                if found:
                    return found
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [])
            if found:
                return found
    return None


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_package_has_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_imports_flow_down_library_to_stages_to_cli():
    for module, imported in import_graph().items():
        if module != "covidray.cli":
            assert "covidray.cli" not in imported, f"{module} imports the CLI"
        if not module.startswith("covidray.stages"):
            assert not any(m.startswith("covidray.stages") for m in imported), \
                f"library module {module} imports a stage: {imported}"


def test_only_the_dataset_module_is_imported_for_its_own_sake():
    """Modules that need the class names take them from covidray.labels."""
    for module, path in module_files().items():
        tree = ast.parse(open(path).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "covidray.datasets":
                names = {a.name for a in node.names}
                assert not names & {"LABELS", "POSITIVE_LABEL", "label_index"}, module


def test_every_cli_stage_has_one_module_one_config_and_its_entry():
    stage_modules = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(PACKAGE, "stages",
                                                                              "*.py"))}
    assert {s.name for s in STAGES} == stage_modules - {"__init__"}
    for stage in STAGES:
        defaults = stage.defaults()
        assert dataclasses.is_dataclass(defaults)
        assert stage.config.split(":")[0] == stage.name == stage.entry.split(":")[0]


@pytest.mark.parametrize("stage", [s.name for s in STAGES])
def test_cli_defaults_are_the_config_defaults(stage):
    required = []
    for name, places in cli_fields(BY_NAME[stage].defaults()).items():
        if places[0][1].metadata["required"]:
            required += [f"--{name.replace('_', '-')}", f"given-{name}"]
    _, config, _ = parse([stage, *required])
    expected = BY_NAME[stage].defaults()
    for name, places in cli_fields(expected).items():
        for path, field, default in places:
            value = config
            for part in path:
                value = getattr(value, part)
            assert value == (f"given-{name}" if field.metadata["required"] else default), path


def test_a_preset_on_the_command_line_supplies_the_values_not_given():
    _, config, _ = parse(["train", "--data", "d", "--run", "r", "--protocol", "demo",
                          "--epochs", "3"])
    assert config == TrainConfig.preset("demo", data="d", run="r", epochs=3)
    assert config.lr == PRESETS["demo"]["lr"] and config.epochs == 3


def test_protocol_run_sets_both_the_training_and_the_evaluation_run():
    _, config, _ = parse(["protocol", "--data", "d", "--run", "s3://b/r", "--bootstrap", "7"])
    assert config.train.run == config.evaluate.run == "s3://b/r"
    assert config.evaluate.bootstrap == 7


def test_demo_does_not_offer_what_it_derives():
    help_text = build_parser()._subparsers._group_actions[0].choices["demo"].format_help()
    assert "--run " not in help_text and "--workdir" in help_text


def doc(name: str = "README.md") -> str:
    with open(os.path.join(REPO, name)) as fh:
        return fh.read()


def test_the_readme_fits_a_page_and_links_every_docs_page():
    text = doc()
    assert len(text.splitlines()) <= 300
    pages = {os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md"))}
    assert pages and all(f"]({page})" in text for page in pages), pages
    for target in re.findall(r"\]\(([^)#:]+)\)", text):  # every relative link resolves
        assert os.path.exists(os.path.join(REPO, target)), target


def test_docs_links_resolve():
    for page in glob.glob(os.path.join(REPO, "docs", "*.md")):
        for target in re.findall(r"\]\(([^)#:]+)\)", open(page).read()):
            assert os.path.exists(os.path.join(os.path.dirname(page), target)), (page, target)


def test_no_library_file_is_over_450_lines():
    long = {p: n for p in module_files().values() if (n := len(open(p).readlines())) > 450}
    assert not long, long


def test_the_top_level_holds_the_model_and_the_subsystems_live_in_their_packages():
    """``covidray/`` itself: at most ~20 modules (the model, its data and evaluation); storage,
    imaging and scoring each in their own package."""
    top = [p for p in glob.glob(os.path.join(PACKAGE, "*.py")) if not p.endswith("__init__.py")]
    assert len(top) <= 21, sorted(os.path.basename(p) for p in top)
    for package in ("storage", "imaging", "scoring", "stages"):
        assert os.path.isdir(os.path.join(PACKAGE, package))


def test_one_onnx_scorer():
    """The exported model is run by onnxruntime in one module: OnnxScorer's (export's parity
    check, which compares raw logits with torch, is the one other session user). A second
    scorer, under any name, would have to open a session."""
    users = {os.path.relpath(path, REPO) for path in module_files().values()
             if re.search(r"InferenceSession|onnx_session\(", open(path).read())}
    assert users == {"covidray/onnx_runtime.py", "covidray/onnx_export.py"}


@pytest.mark.parametrize("stage", [s.name for s in STAGES])
def test_a_stored_config_round_trips(stage):
    from covidray.config import from_dict, to_dict

    config = BY_NAME[stage].defaults()
    assert from_dict(type(config), to_dict(config)) == config


def test_a_config_refuses_a_value_outside_its_bounds_or_choices_as_the_cli_would():
    from covidray.stages.score import ScoreConfig

    with pytest.raises(ValueError, match="--max-removed 2: must be from 0 to 1"):
        ScoreConfig("a", "m", "o", max_removed=2)
    with pytest.raises(ValueError, match="--gpu sometimes: expected one of auto, on, off"):
        ScoreConfig("a", "m", "o", gpu="sometimes")
    with pytest.raises(ValueError, match="--epochs 0: must be at least 1"):
        TrainConfig(data="d", run="r", epochs=0)
    with pytest.raises(ValueError, match="leave no patient to train on"):
        TrainConfig(data="d", run="r", val_fraction=0.5, test_fraction=0.5)


def test_readme_paper_preset_table_is_the_config():
    """The results page's table of the paper's protocol lists TrainConfig's own defaults."""
    section = doc("docs/results.md").split("<!-- paper-preset -->")[1]
    rows = dict(re.findall(r"^\| `--([a-z-]+)` \| `([^`]*)` \|", section, re.M))
    config = TrainConfig()
    flat = {**dataclasses.asdict(config), **dataclasses.asdict(config.augment)}
    assert len(rows) >= 10
    for flag, value in rows.items():
        assert str(flat[flag.replace("-", "_")]) == value, flag


def test_the_code_layout_table_matches_the_files():
    section = doc("docs/development.md").split("## Code layout")[1].split("\n## ")[0]
    named = set()
    for cell in re.findall(r"^\| ([^|]+) \|", section, re.M):
        named |= set(re.findall(r"`([^`]+\.py)`", cell))
    actual = {os.path.relpath(p, REPO) for p in glob.glob(os.path.join(PACKAGE, "**", "*.py"),
                                                          recursive=True)}
    actual = {p for p in actual if not p.endswith("__init__.py")}
    assert named == actual


def test_every_file_imports_only_files_above_it_in_the_code_layout_table():
    """The table is the house's plan, storage at the bottom and the CLI on top: a file that
    imports one listed below it is an arrow running back up."""
    section = doc("docs/development.md").split("## Code layout")[1].split("\n## ")[0]
    rows = [set(re.findall(r"`(covidray/[^`]+\.py)`", cell))
            for cell in re.findall(r"^\| ([^|]+) \|", section, re.M)]
    floor = {path[:-3].replace("/", "."): i for i, row in enumerate(rows) for path in row}
    graph = import_graph()
    for face in [m for m in graph if m not in floor]:  # a package's face: where its names live
        floor[face] = max((floor[m] for m in graph[face] if m in floor), default=0)
    for module, imported in graph.items():
        above = {m for m in imported if floor[m] > floor[module]}
        assert not above, f"{module} imports {above}, listed below it in docs/development.md"


# Each default below must be written exactly once in the package: the grep the issue asks for.
SINGLE_DEFINITIONS = {
    "target sensitivity": r"DEFAULT_TARGET_SENSITIVITY = ",
    "bootstrap replicates": r"DEFAULT_BOOTSTRAP = ",
    "validation/test fractions": r"_fraction: float = option\(0\.15",
    "training threshold": r"\bthreshold: float = option\(0\.5",
    "default seed": r"DEFAULT_SEED = ",
}


@pytest.mark.parametrize("what", sorted(SINGLE_DEFINITIONS))
def test_each_default_is_defined_once(what):
    pattern = re.compile(SINGLE_DEFINITIONS[what])
    hits = []
    for path in module_files().values():
        hits += [path for line in open(path) if pattern.search(line)]
    expected = 2 if what == "validation/test fractions" else 1  # val and test: one each
    assert len(hits) == expected, hits


def test_no_library_function_carries_a_stage_default():
    """Defaults for thresholds, sensitivity, bootstrap and seeds live in the configs only."""
    for path in module_files().values():
        tree = ast.parse(open(path).read())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                defaults = dict(zip([a.arg for a in node.args.args][::-1],
                                    node.args.defaults[::-1]))
                defaults |= {a.arg: d for a, d in zip(node.args.kwonlyargs,
                                                      node.args.kw_defaults) if d is not None}
                for name in ("threshold", "target_sensitivity", "bootstrap", "replicates",
                             "seed", "val_fraction", "test_fraction"):
                    default = defaults.get(name)
                    if isinstance(default, ast.Constant) and default.value is not None:
                        pytest.fail(f"{path}:{node.lineno} {node.name}({name}={default.value})")


def test_the_scoring_batch_the_help_states_is_the_one_the_plan_uses():
    """``--batch-size``'s help restates the plan's default batches: they must agree."""
    import dataclasses as dc

    from covidray.cluster import plan_resources
    from covidray.stages.score import ScoreConfig

    help_text = {f.name: f.metadata["help"] for f in dc.fields(ScoreConfig)}["batch_size"]
    cpu, gpu = (plan_resources({"CPU": 16, "GPU": 1}, use_gpu=g).inference_batch
                for g in (False, True))
    assert f"{cpu} on CPUs" in help_text and f"{gpu} on a GPU" in help_text

