"""A shared deployment: slide roots with no file-system oracle, limits, logins kept apart, audit log.

The oracle was found (issue #22) by asking the app's /open endpoint for ``/etc/passwd`` and
``/etc/doesnotexist`` and reading different answers; these tests ask the same way (handlers and a
launched app through gradio_client) and require identical answers for everything outside the roots.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

gradio_client = pytest.importorskip("gradio_client")

from test_app import GEN, free_port, text, tiny_model

from pathvlm.errors import ConfigError
from pathvlm.ui.deploy import OUTSIDE, DeployConfig, PathRefused, SlideAccess, find_examples

LONG = "x" * 300 + ".png"  # longer than NAME_MAX (255)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture
def tree(tmp_path, ihc_png):
    """root/ with slides (one with a Unicode name, a symlink inside, symlinks out) and a secret beside it."""
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    Image.open(ihc_png).convert("RGB").crop((0, 0, 256, 256)).save(root / "a.png")
    Image.open(ihc_png).convert("RGB").crop((256, 256, 512, 512)).save(root / "sub" / "Schnitt-ü-日本.png")
    (root / "notes.txt").write_text("not a slide")
    secret = tmp_path / "secret.png"
    Image.open(ihc_png).convert("RGB").crop((0, 256, 256, 512)).save(secret)
    (root / "in.png").symlink_to(root / "a.png")
    (root / "out.png").symlink_to(secret)
    (root / "passwd").symlink_to("/etc/passwd")
    (root / "dangling").symlink_to("/etc/doesnotexist")
    (root / "up").symlink_to(tmp_path)
    return root, secret


def outside_paths(root: Path, secret: Path) -> list[str]:
    """Files that exist and files that do not, outside the root, spelled every way we know."""
    return ["/etc/passwd", "/etc/doesnotexist", "/etc", str(Path.home() / ".bashrc"), str(secret),
            str(secret) + ".missing", f"{root}/../secret.png", f"{root}/../nothing.png",
            "../secret.png", "../../../../etc/passwd", "sub/../../secret.png", f"{root}/out.png",
            f"{root}/passwd", f"{root}/dangling", f"{root}/up/secret.png", "up/secret.png",
            "/etc/passwd/../shadow", f"/tmp/{LONG}", "/nonexistent/Schnitt-ü-日本.png", "a.png\x00.svs",
            "/" + "y" * 5000]


def test_access_resolves_inside_and_refuses_outside_alike(tree):
    root, secret = tree
    access = SlideAccess([root])
    assert access.resolve("a.png") == root / "a.png"
    assert access.resolve(str(root / "sub" / ".." / "a.png")) == root / "a.png"
    assert access.resolve("sub/Schnitt-ü-日本.png").name == "Schnitt-ü-日本.png"
    assert access.resolve("in.png") == root / "a.png"  # a symlink that stays inside
    assert access.resolve(LONG) == root / LONG  # inside, missing: later errors may say so
    for p in outside_paths(root, secret):
        with pytest.raises(PathRefused) as err:
            access.resolve(p)
        assert str(err.value) == OUTSIDE, p
    no_roots = SlideAccess([], {"a.png": root / "a.png"})
    assert no_roots.resolve("a.png") == root / "a.png"  # the examples, by name
    with pytest.raises(PathRefused):
        no_roots.resolve(str(root / "sub" / "Schnitt-ü-日本.png"))


def test_open_gives_one_answer_outside_the_roots(model, tree):
    from pathvlm.ui.handlers import Handlers
    from pathvlm.ui.state import Session

    root, secret = tree
    h = Handlers(model, max_new_tokens=4, generation=GEN, deploy=DeployConfig(slide_roots=(root,)))
    answers = set()
    for p in outside_paths(root, secret):
        session, info, viewer, _, status = h.open(None, p, "H&E", Session())
        assert info == "" and viewer is None and session.slides == []
        answers.add(status.split(": ", 1)[1])
    assert answers == {OUTSIDE}
    # inside a root the answer may be specific, and names no server folder
    status = h.open(None, "nothing.svs", "H&E", Session())[-1]
    assert status == "Could not open nothing.svs: file not found"
    status = h.open(None, "notes.txt", "H&E", Session())[-1]
    assert status.startswith("Could not open notes.txt: not a whole-slide image") and str(root) not in status
    status = h.open(None, LONG, "H&E", Session())[-1]
    assert "Could not open" in status and OUTSIDE not in status
    assert h.open(None, "sub/Schnitt-ü-日本.png", "H&E", Session())[-1].startswith("Opened Schnitt-ü-日本")


def test_manifest_paths_obey_the_roots(model, tree, tmp_path):
    from pathvlm.ui.handlers import Handlers
    from pathvlm.ui.state import Session

    root, secret = tree
    h = Handlers(model, max_new_tokens=4, generation=GEN, deploy=DeployConfig(slide_roots=(root,)))
    up = tmp_path / "upload"
    up.mkdir()

    def manifest(name, paths):
        path = up / name
        path.write_text(json.dumps({"id": "c1", "slides": [{"path": p, "stain": "H&E"} for p in paths]}))
        return str(path)

    ok = manifest("good.json", [str(root / "a.png"), "sub/Schnitt-ü-日本.png"])  # relative: under the roots
    session, _, _, _, status = h.open(ok, "", "H&E", Session())
    assert status.startswith("Opened case good (2 slides)") and [s.name for s in session.slides] == ["a", "Schnitt-ü-日本"]
    answers = set()
    for p in ["/etc/passwd", "/etc/doesnotexist", str(secret), "../secret.png", f"{root}/out.png"]:
        session, *_, status = h.open(manifest("bad.json", [str(root / "a.png"), p]), "", "H&E", Session())
        assert session.slides == [], status  # all of a case or nothing
        answers.add(status.replace(p, "<path>"))
    assert answers == {f"Could not open bad.json: slides[1] (<path>): {OUTSIDE}"}
    (up / "bomb.yaml").write_text("a: &a [x, x, x, x, x, x, x, x, x]\n" +
                                  "".join(f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
                                          for p, c in zip("abcdefgh", "bcdefghi")) + "slides: *i\n")
    status = h.open(str(up / "bomb.yaml"), "", "H&E", Session())[-1]
    assert status.startswith("Could not open bomb.yaml:")


def test_limits_give_messages(model, tree, ihc_png):
    from pathvlm.ui.handlers import Handlers
    from pathvlm.ui.state import Session

    root, _ = tree
    a, b = str(root / "a.png"), str(root / "sub" / "Schnitt-ü-日本.png")
    h = Handlers(model, max_new_tokens=4, generation=GEN,
                 deploy=DeployConfig(slide_roots=(root, ihc_png.parent), max_session_slides=1))
    s = h.open(None, a, "H&E", Session())[0]
    status = h.open(None, b, "H&E", s)[-1]
    assert "already holds 1 slides, the limit on this server" in status
    h = Handlers(model, deploy=DeployConfig(slide_roots=(root,), max_pixels=10_000))
    assert "above the limit of 10,000" in h.open(None, a, "H&E", Session())[-1]
    h = Handlers(model, deploy=DeployConfig(slide_roots=(root,), max_session_feature_mb=0.001))
    assert "MB a session" in h.open(None, a, "H&E", Session())[-1]
    h = Handlers(model, deploy=DeployConfig(slide_roots=(root,), max_cache_mb=0.001))
    assert "more than this server keeps for all slides" in h.open(None, a, "H&E", Session())[-1]
    # the process-wide bound: room for one prepared slide, the least recently used one goes
    h = Handlers(model, max_new_tokens=4, generation=GEN, deploy=DeployConfig(slide_roots=(root,)))
    s = h.open(None, a, "H&E", Session())[0]
    one = h.cache.total_bytes
    h.cache.max_bytes = int(one * 1.5)
    s = h.open(None, b, "H&E", s)[0]
    assert len(h.cache) == 1 and h.cache.total_bytes <= h.cache.max_bytes
    s = h.switch("a [H&E]", s)[0]
    *_, last = h.ask("What is this?", "active slide", False, s)
    assert "dropped out of the server's cache; open it again" in last[-1]
    with pytest.raises(ConfigError, match="size"):
        DeployConfig(max_file_size="lots")


def test_audit_log_lines(model, tree, tmp_path):
    from pathvlm.ui.audit import AuditLog, slide_fingerprint
    from pathvlm.ui.handlers import Handlers
    from pathvlm.ui.state import Session

    root, _ = tree
    log_path = tmp_path / "audit" / "app.jsonl"
    for with_text in (False, True):
        log_path.unlink(missing_ok=True)
        audit = AuditLog(log_path, "tiny", "abc123", with_text)
        h = Handlers(model, max_new_tokens=4, generation=GEN, deploy=DeployConfig(slide_roots=(root,)),
                     audit=audit)
        s = h.open(None, "a.png", "H&E", Session(), user="alice")[0]
        *_, last = h.ask("Is there tumour in a.png?", "active slide", False, s, user="alice")
        h.report("colorectal_biopsy", None, None, None, None, None, last[2], user="alice")
        h.open(None, "/etc/passwd", "H&E", Session(), user="bob")
        raw = log_path.read_text(encoding="utf-8")
        rows = [json.loads(line) for line in raw.splitlines()]
        assert [(r["event"], r["user"], r["ok"]) for r in rows] == [
            ("open", "alice", True), ("ask", "alice", True), ("report", "alice", True), ("open", "bob", False)]
        fp = slide_fingerprint(root / "a.png")
        assert all(r["slides"] == [fp] for r in rows[:3]) and rows[3]["slides"] == []
        assert all(r["model"] == "tiny" and r["weights_hash"] == "abc123" and r["time"].endswith("+00:00")
                   for r in rows)
        assert str(root) not in raw and "a.png" not in raw.replace("a.png?", "")
        assert ("Is there tumour" in raw) is with_text
    assert slide_fingerprint(root / "in.png") == fp  # by content: a symlink, a copy, any name


def test_examples_are_names_of_files_that_open(tmp_path, ihc_png):
    root = tmp_path / "slides"
    root.mkdir()
    Image.open(ihc_png).convert("RGB").crop((0, 0, 64, 64)).save(root / "good.png")
    (root / "broken.svs").write_bytes(b"II*\x00" + os.urandom(64))
    (root / "gone.svs").symlink_to(tmp_path / "missing.svs")
    examples = find_examples([root])
    assert "good.png" in examples and "broken.svs" not in examples and "gone.svs" not in examples
    assert "ihc.png" in examples and all(p.exists() and "/" not in n for n, p in examples.items())


@pytest.fixture(scope="module")
def shared_app(model, tmp_path_factory, ihc_png):
    """An app with two logins, one slide root and an audit log, on a free local port."""
    from pathvlm.ui import build_demo, launch_demo
    from pathvlm.ui.audit import AuditLog

    base = tmp_path_factory.mktemp("shared")
    root = base / "root"
    root.mkdir()
    for i, name in enumerate(("alice_slide", "bob_slide")):
        Image.open(ihc_png).convert("RGB").crop((i * 256, 0, i * 256 + 256, 256)).save(root / f"{name}.png")
    deploy = DeployConfig(slide_roots=(root,), max_file_size="1mb")
    audit = AuditLog(base / "audit.jsonl", "tiny", "h")
    demo = build_demo(model, max_new_tokens=6, generation=GEN, deploy=deploy, audit=audit)
    port = free_port()
    launch_demo(demo, port=port, block=False, auth=["alice:apass", "bob:bpass"])
    yield f"http://127.0.0.1:{port}/", root, base
    demo.close()


def login(url, user, tmp_path):
    return gradio_client.Client(url, auth=(user, f"{user[0]}pass"), download_files=str(tmp_path / user),
                                verbose=False)


def chat_questions(chat) -> list[str]:
    return [text(m) for m in chat if m["role"] == "user"]


def test_two_logins_never_see_each_other(shared_app, tmp_path):
    url, _, base = shared_app
    alice, bob = login(url, "alice", tmp_path), login(url, "bob", tmp_path)
    assert alice.predict(None, "alice_slide.png", "H&E", api_name="/open")[-1].startswith("Opened alice_slide")
    assert bob.predict(None, "bob_slide.png", "H&E", api_name="/open")[-1].startswith("Opened bob_slide")
    assert chat_questions(alice.predict("alice asks", "active slide", False, api_name="/ask")[0]) == ["alice asks"]
    assert chat_questions(bob.predict("bob asks", "active slide", False, api_name="/ask")[0]) == ["bob asks"]
    _, js_a, *_ = alice.predict("", "", None, None, None, api_name="/report_colorectal_biopsy")
    _, js_b, *_ = bob.predict("", "", None, None, None, api_name="/report_colorectal_biopsy")
    assert [s["name"] for s in json.loads(Path(js_a).read_text())["slides"]] == ["alice_slide"]
    assert [s["name"] for s in json.loads(Path(js_b).read_text())["slides"]] == ["bob_slide"]

    # bob replays alice's session id: he gets a fresh state of his own, alice keeps hers
    thief = login(url, "bob", tmp_path)
    thief.session_hash = alice.session_hash
    chat = thief.predict("what did alice ask?", "active slide", False, api_name="/ask")
    assert chat_questions(chat[0]) == ["what did alice ask?"]  # no slide, no earlier turns
    _, js, *_, status = thief.predict("", "", None, None, None, api_name="/report_lymphoma")
    assert js is None and "open a slide or image first" in status
    assert thief.predict("alice_slide [H&E]", api_name="/switch") == ("", None)  # not in his case
    again = alice.predict("alice again", "active slide", False, api_name="/ask")[0]
    assert chat_questions(again) == ["alice asks", "alice again"]

    # the API offers no endpoint that returns the state, and the viewer's internal events are private
    api = alice.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert set(api) == {"/open", "/open_example", "/switch", "/ask", "/clear", "/zeroshot", "/ancillary",
                        "/report_colorectal_resection", "/report_colorectal_biopsy", "/report_lymphoma",
                        "/field_tiles"}
    audit = [json.loads(x) for x in (base / "audit.jsonl").read_text().splitlines()]
    assert {r["user"] for r in audit} == {"alice", "bob"}
    assert not any("alice asks" in json.dumps(r) for r in audit)


def test_shared_app_refuses_alike_and_bounds_uploads(shared_app, tmp_path, ihc_png):
    import httpx

    url, root, _ = shared_app
    c = login(url, "alice", tmp_path)
    answers = {c.predict(None, p, "H&E", api_name="/open")[-1].split(": ", 1)[1]
               for p in ["/etc/passwd", "/etc/doesnotexist", str(Path.home() / ".bashrc"),
                         "../../../etc/passwd", f"{root}/../audit.jsonl"]}
    assert answers == {OUTSIDE}
    big = tmp_path / "big.png"
    Image.effect_noise((1024, 1024), 64).convert("RGB").save(big)  # ~1.3 MB of noise, over 1mb
    with pytest.raises(Exception, match="(?i)size|large|exceed"):  # gradio's 413 comes back as an error
        c.predict(gradio_client.handle_file(str(big)), "", "H&E", api_name="/open")
    assert c.predict(gradio_client.handle_file(str(ihc_png)), "", "H&E", api_name="/open")[-1].startswith("Opened ihc")
    # gradio's file route serves no server file either, logged in or not
    with httpx.Client(base_url=url) as web:
        web.post("login", data={"username": "alice", "password": "apass"})
        for p in ("/etc/passwd", str(root / "alice_slide.png")):
            r = web.get(f"gradio_api/file={p}")
            assert r.status_code in (403, 404), (p, r.status_code)
        config = web.get("config").text
    assert "Limits: upload 1mb" in config and str(root) not in config
