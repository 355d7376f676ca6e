"""`mmbridge data shapes|show`, run in-process through the real entry point."""

import json
import os

import pytest
from PIL import Image

from mmbridge.cli import main


def test_shapes_then_show(tmp_path, capsys):
    out = tmp_path / "ds"
    assert main(["data", "shapes", "--out", str(out), "--num", "12", "--seed", "3", "--split", "test",
                 "--format", "wds", "--format", "coco", "--workers", "1", "--shard-size", "5"]) == 0
    m = json.loads((out / "manifest_test.json").read_text())
    assert m["formats"] == ["wds", "coco"] and len(m["files"]["wds"]) == 3 and m["seed"] == 3
    assert not (out / "llava_test.json").exists()
    assert "wrote 12 test scenes" in capsys.readouterr().out

    sheet = tmp_path / "sheet.png"
    assert main(["data", "show", str(out), "--out", str(sheet), "--num", "6", "--cols", "3"]) == 0
    img = Image.open(sheet)
    assert img.width > 3 * 192 and img.height > 2 * 192
    assert main(["data", "show", str(out / "coco_test.json"), "--num", "2"]) == 0
    assert os.path.isfile(out / "contact_sheet.png")


def test_all_formats_default(tmp_path):
    out = tmp_path / "all"
    assert main(["data", "shapes", "--out", str(out), "--num", "6", "--quiet", "--workers", "1"]) == 0
    for name in ("llava_train.json", "coco_train.json", "vqa_train.jsonl", "caption_train.jsonl",
                 "text_train.txt", "pose/coco_pose_train.json", "edits/edits_train.jsonl",
                 "stories/stories_train.jsonl"):
        assert (out / name).is_file(), name
    assert main(["data", "show", str(out / "vqa_train.jsonl"), "--num", "3"]) == 0
    assert main(["data", "show", str(out / "llava_train.json"), "--num", "3"]) == 0


@pytest.mark.parametrize("argv, message", [
    (["data", "shapes", "--out", "X", "--num", "0"], "--num"),
    (["data", "shapes", "--out", "X", "--seed", "-1"], "--seed"),
    (["data", "show", "/nonexistent/dir"], "does not exist"),
])
def test_user_errors(argv, message, capsys, tmp_path):
    argv = [a.replace("X", str(tmp_path / "o")) for a in argv]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_show_empty_dir_and_file_as_out(tmp_path, capsys):
    assert main(["data", "show", str(tmp_path)]) == 2
    assert "no readable samples" in capsys.readouterr().err
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["data", "shapes", "--out", str(f), "--num", "1"]) == 2
