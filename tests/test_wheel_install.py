"""The wheel works without the checkout: build it, install it outside the tree, use it.

Offline: the wheel is built with the venv's setuptools (no build isolation, no index) and
installed with ``--no-deps`` into a temporary folder. A fresh interpreter started with ``-S`` (so
the venv's editable-install hook never runs) and ``PYTHONPATH=<that folder>:<venv site-packages>``
works from another directory: it must import pathvlm from the folder, never from this checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SITE_PACKAGES = sysconfig.get_paths()["purelib"]  # dependencies only; pathvlm there is an editable hook
PACKAGE_DATA = ("pathvlm/configs", "pathvlm/model/weights/demo")
# pip gets a dead proxy: building and installing must not need the network
DEAD_PROXY = "http://127.0.0.1:9"
PIP_ENV = {**os.environ, **{k: DEAD_PROXY for k in ("http_proxy", "https_proxy", "HTTP_PROXY",
                                                     "HTTPS_PROXY")}}

# runs in the installed copy; prints one JSON line that the test checks
SCRIPT = r"""
import json, sys, time
from pathlib import Path

T0 = time.perf_counter()
seconds = {}
def lap(name):
    seconds[name] = round(time.perf_counter() - T0 - sum(seconds.values()), 2)

import pathvlm
from pathvlm.resources import checkout_root, data_dir, demo_weights_dir
from pathvlm.provenance import hash_weight_files

out = {"file": pathvlm.__file__, "sys_path": sys.path, "checkout": str(checkout_root()),
       "data_dir": str(data_dir()), "demo_dir": str(demo_weights_dir())}

from PIL import Image
import skimage

image_path = str(Path(skimage.__file__).parent / "data" / "ihc.png")
image = Image.open(image_path).convert("RGB")
model = pathvlm.load_model("demo")
out["weights_hash"] = model.weights_hash
out["demo_hash"] = hash_weight_files(demo_weights_dir())
lap("load")
out["answer"] = model.ask(image, "What tissue is this?", do_sample=False, max_new_tokens=12)
lap("ask")

from pathvlm.reports import render_report
from pathvlm.reports.from_model import FindingsConfig

# calibrated heads and the template narrative; LLM field choices would add minutes on CPU and
# test drafting, not packaging
report = model.draft_report(image, "colorectal_biopsy", findings_config=FindingsConfig(
    llm_fields=False, narrative_tokens=0))
out["report"] = json.loads(render_report(report, "json"))
lap("report")

clf = pathvlm.ZeroShotClassifier(model, prompts="crc_tissue", progress=False)
pred = clf.predict([image_path])
out["zeroshot"] = {"classes": list(clf.prompt_set.names), "source": clf.prompt_set.source,
                   "top": [list(t) for t in pred.top]}
lap("zeroshot")

from pathvlm.train import load_stage_config
from pathvlm.data import load_class_set

cfg = load_stage_config("clip", "clip_demo")
out["clip_demo_classes"] = load_class_set(cfg.data.classes).path

from pathvlm.case import CaseError, load_case
try:
    load_case("lymphoma_case")
    out["case"] = "loaded"
except CaseError as exc:
    out["case"] = str(exc)

import gradio as gr
from pathvlm.ui.app import build_demo

demo = build_demo(model, max_new_tokens=8)
out["demo_type"] = type(demo).__name__
out["demo_is_blocks"] = isinstance(demo, gr.Blocks)
lap("app")
out["seconds"] = seconds
print("RESULT " + json.dumps(out, default=str))
"""


def _copy_source(dst: Path) -> Path:
    """What `pip wheel .` reads, without build leftovers (a stale build/ would leak into the wheel)."""
    dst.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dst / name)
    shutil.copytree(REPO / "pathvlm", dst / "pathvlm",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    return dst


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = _copy_source(tmp / "src")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
           "--disable-pip-version-check", "-q", "-w", str(tmp / "dist"), str(src)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False, env=PIP_ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = (tmp / "dist").glob("pathvlm-*.whl")
    return path


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site")
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index",
           "--disable-pip-version-check", "-q", "--target", str(target), str(wheel)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False, env=PIP_ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    return target


def test_wheel_holds_configs_and_every_demo_weight_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {p.relative_to(REPO).as_posix() for folder in PACKAGE_DATA
                for p in (REPO / folder).rglob("*")
                if p.is_file() and "__pycache__" not in p.parts}
    assert any(n.endswith(".safetensors") for n in expected)
    assert expected <= names, sorted(expected - names)
    assert "pathvlm/resources.py" in names and not any("__pycache__" in n for n in names)


def test_installed_wheel_works_outside_the_checkout(installed, tmp_path):
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PATHVLM_DATA")}
    env.update(PYTHONPATH=os.pathsep.join([str(installed), SITE_PACKAGES]), OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    done = subprocess.run([sys.executable, "-S", "-c", SCRIPT], cwd=work, env=env,
                          capture_output=True, text=True, timeout=1200, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    out = json.loads(line[len("RESULT "):])

    # imported from the installed copy, with the checkout nowhere on the path
    assert Path(out["file"]).resolve().is_relative_to(installed.resolve()), out["file"]
    assert not any(p and Path(p).resolve() == REPO for p in out["sys_path"])
    assert out["checkout"] == "None" and out["data_dir"] == "None"
    assert Path(out["demo_dir"]).resolve().is_relative_to(installed.resolve())

    # demo model from the wheel's own weights; an answer; a report with provenance
    assert out["weights_hash"] and out["weights_hash"] == out["demo_hash"]
    assert isinstance(out["answer"], str) and out["answer"].strip()
    report = out["report"]
    assert report["draft"] is True and report["report_type"] == "colorectal_biopsy"
    assert report["provenance"]["weights_hash"] == out["weights_hash"]
    assert "git_commit" not in report["provenance"]  # no checkout: absent, not guessed

    # packaged names resolve inside the installed package
    zs = out["zeroshot"]
    assert zs["classes"] == ["ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM"]
    assert Path(zs["source"]).resolve().is_relative_to(installed.resolve())
    assert len(zs["top"]) == 1 and zs["top"][0][0] in zs["classes"]
    assert Path(out["clip_demo_classes"]).resolve().is_relative_to(installed.resolve())
    assert "example data is not installed" in out["case"]

    assert out["demo_is_blocks"], out["demo_type"]
