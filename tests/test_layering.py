"""The package's layers, from the bottom: foundations (errors, files, seeding, input_norms) ->
models (architectures) -> config -> method -> data | weights -> runtime -> commands -> cli.
Each folder imports only what lies below it; only the runtime imports DeepSpeed or
torch.distributed; Slurm is known only to commands/slurm.py and slurm/."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "dbot_ds"
FOUNDATIONS = {"errors", "files", "seeding", "input_norms"}
# a layer -> the layers below it that it may import (besides itself and the foundations)
MAY_IMPORT = {
    "foundations": set(),
    "models": set(),
    "config": {"models"},
    "method": {"models", "config"},
    "data": {"config"},
    "weights": {"models", "config", "method"},
    "runtime": {"models", "config", "method", "weights"},
    "commands": {"models", "config", "method", "data", "weights", "runtime"},
    "cli": {"commands"},
}


def place(module: str) -> str:
    """dbot_ds.<module> -> its layer."""
    return "foundations" if module in FOUNDATIONS else module.split(".")[0]


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module == "dbot_ds":  # from dbot_ds import runtime: the layer is the name imported
                names.update(f"dbot_ds.{a.name}" for a in node.names)
    return names


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name != "__main__.py":
            name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")
            yield name, path


def violations(name: str, imported: set[str]) -> set[str]:
    """What module `name` imports (dbot_ds.* names without the prefix) that lies above it."""
    layer = place(name)
    return {m for m in imported if place(m) not in {layer, "foundations", *MAY_IMPORT[layer]}}


@pytest.mark.parametrize("name,path", list(modules()), ids=lambda v: v if isinstance(v, str) else "")
def test_each_module_imports_only_what_lies_below_it(name, path):
    imported = {m.removeprefix("dbot_ds.") for m in imports(path) if m.startswith("dbot_ds.")}
    assert not violations(name, imported), f"{name} ({place(name)}) imports {sorted(violations(name, imported))}"


def test_only_the_runtime_engine_and_checkpoint_import_deepspeed_and_only_the_runtime_torch_distributed():
    deepspeed = {name for name, path in modules() if any(m.split(".")[0] == "deepspeed" for m in imports(path))}
    assert deepspeed == {"runtime.engine", "runtime.checkpoint"}
    distributed = {name for name, path in modules() if any(m.startswith("torch.distributed") for m in imports(path))}
    assert distributed and all(place(n) == "runtime" for n in distributed), distributed


def test_the_rules_catch_upward_imports():
    assert violations("method.tasks", {"runtime.engine", "config", "method.losses"}) == {"runtime.engine"}
    assert violations("data.loader", {"method.tasks", "weights.rundir"}) == {"method.tasks", "weights.rundir"}
    assert violations("models.vit", {"config"}) == {"config"}
    assert violations("config.pretrain", {"models.sizes", "method.masking"}) == {"method.masking"}
    assert violations("runtime.trainer", {"commands.pretrain"}) == {"commands.pretrain"}
    assert violations("commands.pretrain", {"runtime.trainer", "data.loader", "seeding"}) == set()
