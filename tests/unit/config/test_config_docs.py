"""docs/configuration.md is generated from the configuration model and cannot drift from it.

``tools/gen_config_docs.py`` renders every key of ``ntonix.config`` (type, default,
environment variable, flag) with a description and a reload rule kept in the script. These
tests fail when a key has no description, when the committed file differs from what the script
generates now, or when a documented flag is not what ``python -m ntonix`` accepts.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest

from ntonix import config as model
from ntonix.__main__ import parser
from tools import gen_config_docs

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def gen() -> ModuleType:
    return gen_config_docs


def test_every_key_has_a_description_and_a_reload_rule(gen: ModuleType) -> None:
    assert gen.missing() == []


def test_committed_configuration_md_is_the_generated_one(gen: ModuleType) -> None:
    committed = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert committed == gen.render(), "docs/configuration.md is out of date: run python scripts/gen_config_docs.py"


def test_every_key_and_environment_variable_appears(gen: ModuleType) -> None:
    text = gen.render()
    for section, key, typ, _ in model.leaf_keys():
        assert f"`{section}.{key}`" in text
        if gen.type_name(typ) != "object":  # objects (ssl.sni) come from the file only
            assert f"`{model.env_name(section, key)}`" in text
    for name in [*model.ENV_SHORTCUTS, "NTONIX_CONFIG", "NTONIX_BACKENDS"]:
        assert f"`{name}`" in text


def test_documented_flags_are_the_cli_flags(gen: ModuleType) -> None:
    options = {opt for action in parser()._actions for opt in action.option_strings if opt.startswith("--")}
    documented = set(gen.FLAGS.values()) | {flag.split()[0] for flag in gen.OTHER_FLAGS}
    assert documented == options


def test_type_names_cover_the_model(gen: ModuleType) -> None:
    assert {gen.type_name(typ) for _, _, typ, _ in model.leaf_keys()} <= {
        "boolean", "integer", "number", "string", "list of strings", "object"}
