"""Package data by name or path: one resolver, `pathvlm list ...`, case data roots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pathvlm.case import CaseError, load_case
from pathvlm.cli import main
from pathvlm.data import load_class_set
from pathvlm.errors import ConfigError
from pathvlm.resources import (
    DATA_ROOTS,
    expand_data_path,
    list_resources,
    package_path,
    resolve_resource,
    resource_file,
)
from pathvlm.train import load_stage_config
from pathvlm.zeroshot import ZeroShotClassifier, load_prompts

PACKAGE = Path(__file__).resolve().parents[1] / "pathvlm"


def test_packaged_names_are_the_files_in_the_package():
    for kind, folder, suffix in (("prompts", "prompts", ".json"), ("classes", "classes", ".yaml"),
                                 ("configs", "train", ".yaml"), ("cases", "cases", ".yaml")):
        files = sorted(p.stem for p in (PACKAGE / "configs" / folder).glob(f"*{suffix}"))
        assert files and list_resources(kind) == files, kind
    assert {"crc_tissue", "lymphoma"} <= set(list_resources("prompts"))
    assert "clip_demo" in list_resources("configs")
    assert package_path("configs").resolve() == (PACKAGE / "configs").resolve()


def test_name_path_and_file_name_resolve_to_the_same_file(tmp_path, monkeypatch):
    packaged = resource_file("prompts", "crc_tissue")
    assert packaged.is_file() and packaged.parent == package_path("configs", "prompts")
    assert resolve_resource("prompts", "crc_tissue") == packaged
    assert resolve_resource("prompts", "crc_tissue.json") == packaged
    own = tmp_path / "mine.json"
    own.write_text(json.dumps({"classes": {"a": ["x"], "b": ["y"]}}))
    assert resolve_resource("prompts", own) == own and resolve_resource("prompts", str(own)) == own
    # an existing file wins over a packaged name, as a path given on purpose should
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lymphoma.json").write_text("{}")
    assert resolve_resource("prompts", "lymphoma.json") == Path("lymphoma.json")


@pytest.mark.parametrize("kind, spec", [("prompts", "crc_tisue"), ("classes", "nope"),
                                        ("configs", "clip_dem"), ("prompts", "some/dir/x.json")])
def test_unknown_name_is_one_error_listing_known_names(kind, spec):
    with pytest.raises(ConfigError) as exc:
        resolve_resource(kind, spec)
    message = str(exc.value)
    assert message.startswith(f"{spec}: no such file, and not a packaged") and "\n" not in message
    for name in list_resources(kind):
        assert name in message
    assert f"pathvlm list {kind}" in message


def test_callers_accept_names():
    assert load_prompts("lymphoma").names == load_prompts(resource_file("prompts", "lymphoma")).names
    assert load_class_set("crc_tissue").labels == load_class_set(
        package_path("configs", "classes", "crc_tissue.yaml")).labels
    cfg = load_stage_config("clip", "clip_demo", ["train.steps=3"])
    assert cfg.train.steps == 3 and cfg.data.classes == "lymphoma"
    assert load_class_set(cfg.data.classes).labels  # the packaged configs name their class files
    with pytest.raises(ConfigError, match="not a packaged training config"):
        load_stage_config("clip", "no_such_config")


def test_zero_shot_by_prompt_name():
    from pathvlm.encoders import create_encoder

    torch.manual_seed(0)
    encoder, _ = create_encoder("openclip:pathvlm-tiny", device="cpu")
    clf = ZeroShotClassifier(encoder, prompts="crc_tissue", progress=False)
    assert clf.prompt_set.names == load_prompts("crc_tissue").names
    assert clf.prompt_set.source == str(resource_file("prompts", "crc_tissue"))
    assert clf.class_embeddings.shape[0] == len(clf.prompt_set.names)
    with pytest.raises(ConfigError, match="known: crc_tissue, lymph_node_metastasis, lymphoma"):
        ZeroShotClassifier(encoder, prompts="crc")


def test_list_commands(capsys):
    for kind in ("prompts", "classes", "configs", "cases"):
        assert main(["list", kind]) == 0
        names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
        assert names == list_resources(kind)
    assert main(["list", "models"]) == 0 and "demo" in capsys.readouterr().out


def test_version_flag(capsys):
    from pathvlm import __version__

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"pathvlm {__version__}"


def test_case_data_root(tmp_path, monkeypatch):
    (tmp_path / "lymphoma_nia" / "MCL").mkdir(parents=True)
    (tmp_path / "lymphoma_nia" / "MCL" / "sj-04-4525-R4_263.png").write_bytes(b"")
    monkeypatch.setenv("PATHVLM_DATA", str(tmp_path))
    case = load_case("lymphoma_case")  # a packaged example by name
    assert case.slides[0].path == tmp_path / "lymphoma_nia" / "MCL" / "sj-04-4525-R4_263.png"
    assert case.slides[1].path.name == "ihc.png" and case.slides[1].path.is_file()
    assert expand_data_path("${PATHVLM_DATA}/x/y.svs") == tmp_path / "x" / "y.svs"
    assert expand_data_path("rel/x.svs") == Path("rel/x.svs")
    assert expand_data_path("$HOME_NOT_A_ROOT/x") == Path("$HOME_NOT_A_ROOT/x")


def test_case_without_data_says_it_is_not_installed(monkeypatch):
    monkeypatch.delenv("PATHVLM_DATA", raising=False)
    monkeypatch.setitem(DATA_ROOTS, "PATHVLM_DATA", lambda: None)
    with pytest.raises(CaseError) as exc:
        load_case("colorectal_resection_case")
    assert exc.value.entry == "slides[0]" and "example data is not installed" in exc.value.problem
    assert "set PATHVLM_DATA" in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(CaseError, match="manifest: cannot read: no such file.*lymphoma_case"):
        load_case("lymphoma_cas")
