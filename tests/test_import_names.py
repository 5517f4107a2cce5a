"""No import name of the project's is also another distribution's.

transformers 5.25 began requiring Hugging Face's `kernels`, while this project shipped a
top-level `kernels` package of its own: from the repo root ours shadowed theirs (every
tokenizer load failed), from anywhere else theirs shadowed ours. Both checks below failed
on that layout.
"""

from __future__ import annotations

from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "sglbatch"


def _owners_other_than_us(name: str) -> list[str]:
    return sorted({d for d in packages_distributions().get(name, []) if d != PROJECT})


def test_no_installed_top_level_name_is_also_another_distributions():
    shipped = [name for name, dists in packages_distributions().items() if PROJECT in dists]
    assert PROJECT in shipped, "sglbatch is not installed (pip install -e '.[test]')"
    clashes = {name: _owners_other_than_us(name) for name in shipped
               if _owners_other_than_us(name)}
    assert not clashes, f"import names shared with other distributions: {clashes}"


def test_nothing_importable_from_the_repo_root_shadows_an_installed_distribution():
    # `python -m pytest` and `python -m sglbatch` put the repo root first on sys.path, so a
    # package or module here wins over an installed distribution of the same name.
    importable = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    importable |= {p.stem for p in ROOT.glob("*.py")}
    clashes = {name: _owners_other_than_us(name) for name in sorted(importable)
               if _owners_other_than_us(name)}
    assert not clashes, f"repo-root names that shadow installed distributions: {clashes}"
