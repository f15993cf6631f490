"""Dependencies point one way: only the engine and checkpoint modules know DeepSpeed; models,
masking and losses know nothing of DeepSpeed, torch.distributed or Slurm."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dbot_ds"


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_only_the_engine_and_checkpoint_modules_import_deepspeed():
    importers = {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")
                 if any(m.split(".")[0] == "deepspeed" for m in imported_modules(p))}
    assert importers == {"engine.py", "checkpoint.py"}


def test_models_masking_and_losses_know_nothing_of_distribution():
    pure = [*PACKAGE.glob("models/*.py"), PACKAGE / "masking.py", PACKAGE / "losses.py"]
    for path in pure:
        bad = {m for m in imported_modules(path)
               if m.split(".")[0] == "deepspeed" or m.startswith("torch.distributed") or "slurm" in m}
        assert not bad, f"{path.name} imports {bad}"
