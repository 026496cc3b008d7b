"""Mutated slides, images and case manifests: every one gets a clear answer, in bounded time.

Inputs are built from ../shared/data/wsi (when present) and scikit-image's ihc.png into tmp dirs:
truncations, zero-filled copies, bit-flipped headers, wrong extensions, headers that claim
10^6 x 10^6 px, TIFF tiles that point past the end of the file; manifests truncated, bit-flipped,
of the wrong shape, alias bombs, paths outside the slide roots. The CLI (``info``, ``tile``,
``report``) must exit 0 or 2 with one problem line naming the file and no traceback or partial
output; the app must answer with one status line.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
import time
import zlib
from pathlib import Path

import pytest
import torch
import yaml

from pathvlm import cli
from pathvlm.model import ModelConfig, build_model

TINY_LLM = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True}
TIME_LIMIT_S = 60.0  # per input and command, on a loaded 2-core box
TRIED: dict[str, int] = {}  # inputs tried per test, printed at the end (README reliability figures)
SUMMARY: list[str] = []


# ------------------------------------------------------------------ building the inputs
def _tiff_tags(data: bytes) -> dict[int, tuple[int, int, int]]:
    """Tags of the first IFD of a little-endian classic TIFF: code -> (type, count, value offset)."""
    if data[:4] != b"II*\x00":
        return {}
    (ifd,) = struct.unpack_from("<I", data, 4)
    (n,) = struct.unpack_from("<H", data, ifd)
    tags = {}
    for i in range(n):
        code, typ, count, _ = struct.unpack_from("<HHII", data, ifd + 2 + 12 * i)
        tags[code] = (typ, count, ifd + 2 + 12 * i + 8)
    return tags


def _set_long(data: bytearray, tags: dict, code: int, value: int) -> None:
    typ, _, at = tags[code]
    if typ == 3:
        struct.pack_into("<H", data, at, min(value, 0xFFFF))
    else:
        struct.pack_into("<I", data, at, value)


def _huge_png(src: Path) -> bytes:
    """ihc.png whose IHDR claims 10^6 x 10^6 px (CRC fixed, so only the size is wrong)."""
    data = bytearray(src.read_bytes())
    struct.pack_into(">II", data, 16, 1_000_000, 1_000_000)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def slide_inputs(sources: list[Path], out: Path, seed: int = 0) -> list[Path]:
    """Mutations of each source file, written to ``out``."""
    rng = random.Random(seed)
    made: list[Path] = []

    def put(name: str, data: bytes) -> None:
        path = out / name
        path.write_bytes(data)
        made.append(path)

    for src in sources:
        data, stem, suf = src.read_bytes(), src.stem, src.suffix
        for cut in (0, 8, 64, 1024, len(data) // 10, len(data) // 2, len(data) * 9 // 10, len(data) - 1):
            put(f"{stem}.trunc{cut}{suf}", data[:cut])
        put(f"{stem}.zeros{suf}", bytes(len(data)))
        for k in range(6):
            flipped = bytearray(data)
            for _ in range(8):
                i = rng.randrange(min(len(data), 4096))
                flipped[i] ^= 1 << rng.randrange(8)
            put(f"{stem}.flip{k}{suf}", bytes(flipped))
        wrong = {".svs": ".png", ".tiff": ".jpg", ".dcm": ".svs", ".png": ".svs"}.get(suf.lower(), ".tiff")
        put(f"{stem}.wrongext{wrong}", data)
        tags = _tiff_tags(data)
        if 256 in tags and 257 in tags:  # ImageWidth / ImageLength
            huge = bytearray(data)
            _set_long(huge, tags, 256, 1_000_000)
            _set_long(huge, tags, 257, 1_000_000)
            put(f"{stem}.huge{suf}", bytes(huge))
        if 324 in tags:  # TileOffsets: every tile past the end of the file, then only the last one
            _, count, at = tags[324]
            (table,) = struct.unpack_from("<I", data, at) if count > 1 else (None,)
            for name, which in (("tilespast", range(count)), ("lasttilepast", range(count - 1, count))):
                past = bytearray(data)
                for i in which:
                    pos = table + 4 * i if table is not None else at
                    struct.pack_into("<I", past, pos, len(data) + 4096 * (i + 1))
                put(f"{stem}.{name}{suf}", bytes(past))
        if suf.lower() == ".png":
            put(f"{stem}.huge.png", _huge_png(src))
    return made


def manifest_inputs(good: Path, out: Path, seed: int = 0) -> list[Path]:
    """Mutations of a valid case manifest whose slide is ``good``."""
    rng = random.Random(seed)
    base = {"id": "fuzz-001", "slides": [{"path": str(good), "stain": "H&E", "part": "A"}],
            "clinical": {"procedure": "Excisional biopsy"},
            "ancillary_results": [{"test": "IHC", "target": "CD20", "result": "positive"}]}
    text = yaml.safe_dump(base, sort_keys=False)
    made: list[Path] = []

    def put(name: str, content: str | bytes) -> None:
        path = out / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        made.append(path)

    put("valid.yaml", text)
    for cut in (0, 1, 10, len(text) // 3, len(text) // 2, len(text) - 5):
        put(f"trunc{cut}.yaml", text[:cut])
    for k in range(6):
        raw = bytearray(text.encode())
        for _ in range(4):
            i = rng.randrange(len(raw))
            raw[i] ^= 1 << rng.randrange(8)
        put(f"flip{k}.yaml", bytes(raw))
    put("zeros.yaml", bytes(200))
    put("binary.json", bytes(range(256)))
    put("list.yaml", "- a\n- b\n")
    put("scalar.json", "42")
    shapes = {"slides_str": {**base, "slides": "x.svs"}, "slides_ints": {**base, "slides": [1, 2]},
              "no_slides": {"id": "x"}, "empty_slides": {**base, "slides": []}, "id_null": {**base, "id": None},
              "bad_stain": {**base, "slides": [{"path": str(good), "stain": "Giemsa??"}]},
              "extra_key": {**base, "surprise": 1}, "bad_result": {**base, "ancillary_results": [
                  {"test": "IHC", "target": "CD20", "result": "maybe"}]},
              "unknown_clinical": {**base, "clinical": {"favourite_colour": "blue"}},
              "dup": {**base, "slides": base["slides"] * 2},
              "missing_slide": {**base, "slides": [{"path": str(good.parent / "nope.svs")}]},
              "outside_passwd": {**base, "slides": [{"path": "/etc/passwd"}]},
              "outside_missing": {**base, "slides": [{"path": "/etc/doesnotexist"}]},
              "dotdot": {**base, "slides": [{"path": "../../../../etc/passwd"}]},
              "long_path": {**base, "slides": [{"path": "a" * 5000 + ".svs"}]},
              "nul_path": {**base, "slides": [{"path": "a\x00b.svs"}]},
              "deep": {**base, "clinical": {"procedure": json.loads("[" * 500 + "]" * 500)}}}
    for name, data in shapes.items():
        put(f"{name}.json", json.dumps(data))
    put("deep_yaml.yaml", "id: x\nslides: " + "[" * 5000 + "]" * 5000 + "\n")
    put("bomb.yaml", "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi")) + "id: bomb\nslides: *i\nclinical: {procedure: *i}\n")
    put("json_as_yaml.yaml", json.dumps(base))
    put("bom.yaml", "\ufeff" + text)
    put("tabs.yaml", text.replace("  ", "\t"))
    put("big.yaml", text + "# " + "x" * (300 << 10) + "\n")
    return made


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def sources(ihc_png, tmp_path_factory) -> list[Path]:
    from conftest import shared_data_dir

    out = [ihc_png]
    data = shared_data_dir()
    if data is not None and (data / "wsi").is_dir():
        out += sorted(p for p in (data / "wsi").iterdir() if p.suffix.lower() in {".svs", ".tiff", ".dcm"})
    return out


@pytest.fixture(scope="module")
def slide_files(sources, tmp_path_factory) -> list[Path]:
    return slide_inputs(sources, tmp_path_factory.mktemp("fuzz-slides"))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A tiny model that cuts slides into few tiles (32 px at 8 um/px), saved as a run directory."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder="openclip:pathvlm-tiny", n_tokens=4, hidden_dim=32,
                                    llm_config=TINY_LLM, tile_size=32, tile_mpp=8.0))
    return model.save_pretrained(tmp_path_factory.mktemp("fuzz-model") / "tiny")


def run_cli(argv: list[str], capfd: pytest.CaptureFixture) -> tuple[int, str, str, float]:
    """Exit code, stdout, stderr and seconds of ``pathvlm ARGV``; captured at the file-descriptor
    level, so what libtiff, OpenSlide or glib print themselves counts too."""
    capfd.readouterr()
    t0 = time.perf_counter()
    rc = cli.main(argv)
    secs = time.perf_counter() - t0
    out, err = capfd.readouterr()
    return rc, out, err, secs


def one_problem(path: Path, stderr: str, also: str | None = None) -> str:
    """The single problem the CLI reported for ``path`` (it may be repeated in a batch summary);
    it names ``path`` (or ``also``: a slide named in the manifest ``path``)."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert lines and "Traceback" not in stderr, (path.name, stderr)
    problems = {ln.split(": ", 1)[1] for ln in lines if ln.startswith(("error: ", "failed: "))}
    assert len(problems) == 1 and len(lines) <= 2, (path.name, stderr)
    problem = problems.pop()
    assert path.name in problem or (also and also in problem), (path.name, problem)
    return problem


# ------------------------------------------------------------------ the tests
def test_cli_info_and_tile_on_mutated_slides(slide_files, tmp_path, capfd):
    answers = {0: 0, 2: 0}
    for path in slide_files:
        rc, out, err, secs = run_cli(["-q", "info", str(path)], capfd)
        assert rc in (0, 2) and secs < TIME_LIMIT_S, (path.name, rc, secs, err)
        if rc == 2:
            one_problem(path, err)
            assert out == ""
        answers[rc] += 1
        dest = tmp_path / path.name
        rc, out, err, secs = run_cli(["-q", "tile", str(path), "--out", str(dest), "--slide-mpp", "0.5",
                                      "--mpp", "4", "--size", "32"], capfd)
        assert rc in (0, 2) and secs < TIME_LIMIT_S, (path.name, rc, secs, err)
        if rc == 2:
            one_problem(path, err)
            assert not dest.exists() or not any(dest.iterdir()), f"{path.name}: partial output"
        else:
            assert len(list(dest.iterdir())) == 2  # the .h5 grid and its PNG overlay
        answers[rc] += 1
    TRIED["cli slides"] = len(slide_files)
    SUMMARY.append(f"fuzz: {len(slide_files)} mutated slide/image files x (info, tile): "
          f"{answers[0]} answered, {answers[2]} refused with one line")
    assert answers[2] >= len(slide_files)  # most mutations must be refused, not silently accepted


def test_app_open_on_mutated_slides(slide_files, tiny_run, ihc_png):
    from pathvlm.model import load_model
    from pathvlm.ui.handlers import Handlers
    from pathvlm.ui.state import Session

    h = Handlers(load_model(tiny_run), max_new_tokens=2)
    assert h.open(str(ihc_png), "", "H&E", Session())[-1].startswith("Opened ihc")  # warm: first call imports
    opened = refused = 0
    for path in slide_files:
        t0 = time.perf_counter()
        session, _, viewer, _, status = h.open(str(path), "", "H&E", Session())
        secs = time.perf_counter() - t0
        assert secs < TIME_LIMIT_S and "\n" not in status and "Traceback" not in status, (path.name, status)
        if status.startswith("Opened"):
            opened += 1
            assert viewer is not None and len(session.slides) == 1
        else:
            refused += 1
            assert status.startswith(f"Could not open {path.name}: ") and session.slides == [], status
            assert str(path.parent) not in status  # no server folder in the message
    TRIED["app slides"] = len(slide_files)
    SUMMARY.append(f"fuzz: app opened {opened}, refused {refused} of {len(slide_files)} mutated files")
    assert refused > opened


def test_mutated_manifests(ihc_png, tiny_run, tmp_path, capfd):
    from pathvlm.case import CaseError, load_case
    from pathvlm.model import load_model
    from pathvlm.ui.deploy import DeployConfig
    from pathvlm.ui.handlers import Handlers
    from pathvlm.ui.state import Session

    root = tmp_path / "root"
    root.mkdir()
    good = root / "ihc.png"
    shutil.copy(ihc_png, good)
    files = manifest_inputs(good, tmp_path)
    h = Handlers(load_model(tiny_run), max_new_tokens=2, deploy=DeployConfig(slide_roots=(root,)))
    assert h.open(str(good), "", "H&E", Session())[-1].startswith("Opened ihc")  # warm: first call imports
    results = {"ok": 0, "refused": 0}
    for path in files:
        slide = None
        try:
            slide = str(load_case(path).slides[0].path)
            library_ok = True
        except CaseError as exc:
            assert path.name in str(exc) and "\n" not in str(exc), str(exc)
            library_ok = False
        out = tmp_path / f"{path.name}.report.json"
        rc, stdout, err, secs = run_cli(["-q", "report", str(path), "--type", "lymphoma", "--model",
                                         str(tiny_run), "--narrative-tokens", "0", "--out", str(out)], capfd)
        # a manifest that loads may still list a file that is no slide (/etc/passwd): then the
        # one line names that file
        assert secs < TIME_LIMIT_S and rc in ((0, 2) if library_ok else (2,)), (path.name, rc, err)
        if rc == 2:
            one_problem(path, err, also=slide)
            assert not out.exists() and stdout == "", f"{path.name}: partial output"
        t0 = time.perf_counter()
        session, *_, status = h.open(str(path), "", "H&E", Session())
        assert time.perf_counter() - t0 < TIME_LIMIT_S and "\n" not in status, (path.name, status)
        if status.startswith("Opened case"):  # the app takes slides and results, not clinical values
            assert library_ok and len(session.slides) == 1
            results["ok"] += 1
        else:
            assert status.startswith(f"Could not open {path.name}: ") and session.slides == [], status
            results["refused"] += 1
    TRIED["manifests"] = len(files)
    SUMMARY.append(f"fuzz: {len(files)} manifests: {results['ok']} opened, {results['refused']} refused "
          "(the app opens only what the library loads)")
    assert results["ok"] >= 1 and results["refused"] >= len(files) - 5


def test_zz_count():
    """The number of inputs tried (README reliability section)."""
    print("\n" + "\n".join(SUMMARY) + f"\nfuzz inputs tried: {TRIED} (total {sum(TRIED.values())})")
