"""One bundle locator: every command takes a bundle name, alias or folder the same way."""

import pytest

from monai_ld.bundles import BUNDLE_NAMES, resolve_bundle
from monai_ld.cli import main as cli_main


@pytest.mark.parametrize("alias,name", [("brain", BUNDLE_NAMES[0]), ("cxr", BUNDLE_NAMES[1]), ("chest", BUNDLE_NAMES[1]),
                                        (BUNDLE_NAMES[0], BUNDLE_NAMES[0])])
def test_resolve_bundle_names_and_aliases(alias, name):
    p = resolve_bundle(alias)
    assert p.name == name and (p / "configs" / "metadata.json").is_file()
    assert resolve_bundle(str(p)) == p  # a folder is taken as it is


@pytest.mark.parametrize("command", ["evaluate", "sweep-drift"])
@pytest.mark.parametrize("alias", ["brain", "cxr"])
def test_evaluation_commands_take_aliases(command, alias, tmp_path, capsys):
    # the README's `monai-ld sweep-drift --bundle brain` used to fail: the evaluation commands took folders only.
    # A missing checkpoint is the first thing checked after the bundle resolves, so its error proves the alias worked.
    rc = cli_main([command, "--bundle", alias, "--output-dir", str(tmp_path / "o"), "--checkpoint", str(tmp_path / "no.pt")])
    err = capsys.readouterr().err
    assert rc == 2 and "no.pt" in err and "is not a bundle" not in err


@pytest.mark.parametrize("argv", [["evaluate", "--output-dir", "o"], ["sweep-drift", "--output-dir", "o"],
                                  ["demo"], ["train"], ["finetune"]])
def test_unknown_bundle_one_clear_error(argv, capsys):
    assert cli_main([argv[0], "--bundle", "liver", *argv[1:]]) == 2
    err = capsys.readouterr().err
    assert "'liver' is not a bundle" in err and "brain" in err and "cxr" in err


def test_a_same_named_folder_in_the_cwd_does_not_hide_the_bundle(tmp_path, monkeypatch):
    (tmp_path / "brain").mkdir()  # e.g. a folder of the user's scans
    monkeypatch.chdir(tmp_path)
    assert resolve_bundle("brain").name == BUNDLE_NAMES[0]
